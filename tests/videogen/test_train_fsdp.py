"""`train --fsdp` (FSDP2) with 2 CPU processes (gloo) on a tiny model: matches DDP, resumes exactly, and writes
full checkpoints that load without FSDP (and resume under DDP, and vice versa)."""

import faulthandler
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mhla_core.checkpoint import load_state, load_weights
from mhla_videogen import train
from mhla_videogen.fsdp import rekey_optimizer_state

from .conftest import TINY_WAN
from .test_train import _args

WORLD = 2
TIMEOUT = 240  # s, for the 2-process runs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny softmax Wan transformer in base/wan/transformer and 4 random latent clips in base/latents."""
    from diffusers import WanTransformer3DModel

    base = tmp_path_factory.mktemp("videogen_fsdp")
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY_WAN).save_pretrained(base / "wan" / "transformer")
    lat = base / "latents"
    lat.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_file({"latents": torch.randn(4, 2, 8, 12, generator=g), "text": torch.randn(3 + i, 16, generator=g)},
                  str(lat / f"{i:07d}.safetensors"))
    save_file({"text": torch.randn(1, 16, generator=g)}, str(lat / "empty.safetensors"))
    return base


def _free_ports(n: int, start: int = 29600) -> list[int]:
    """`n` bindable ports below the ephemeral range: a rank that retries connecting to a port in that range
    before rank 0 listens can end up connected to itself (TCP self-connect) and hang."""
    ports = []
    for port in range(start, start + 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports from {start}")


def _worker(rank: int, runs: list[list[str]], ports: list[int]) -> None:
    """One rank of torchrun, by hand: each run joins (and leaves) its own process group."""
    faulthandler.dump_traceback_later(TIMEOUT - 30, exit=True)  # a hung rank shows where it hangs
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    # torch 2.11 + gloo: a gloo worker thread that still releases the last collective's tensors needs the GIL,
    # while the group's destructor (run when train.run drops its DDP model) joins it holding the GIL: deadlock.
    # One training per process rarely meets it; several per process do, unless the threads get a moment first.
    destroy = dist.destroy_process_group

    def pause_then_destroy(*args, **kwargs):
        time.sleep(0.2)
        destroy(*args, **kwargs)

    dist.destroy_process_group = pause_then_destroy
    torch.set_num_threads(1)
    for argv, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        train.main(argv)


def _spawn(runs: list[list[str]], timeout: float = TIMEOUT) -> None:
    ctx = mp.start_processes(_worker, args=(runs, _free_ports(len(runs))), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-process training did not finish in {timeout} s")


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_fsdp_matches_ddp_and_resumes(base):
    """2 steps of 2 ranks x 1 clip, EMA on, gradient checkpointing on (the default)."""
    lat = base / "latents"

    def args(name, steps, *extra):
        argv = _args(base, lat, base / name, "--max-steps", str(steps), "--ema-decay", "0.9", *extra)
        argv[argv.index("--batch-size") + 1] = "1"  # 2 ranks x 1 clip
        return argv

    fsdp = ("--fsdp",)
    _spawn([
        args("fsdp", 2, *fsdp),  # straight
        args("fsdp_r", 1, *fsdp), args("fsdp_r", 2, *fsdp, "--resume"),  # FSDP -> FSDP
        args("ddp", 2),  # the reference
        args("ddp_f", 1), args("ddp_f", 2, *fsdp, "--resume"),  # DDP checkpoint -> FSDP
        args("fsdp_d", 1, *fsdp), args("fsdp_d", 2, "--resume"),  # FSDP checkpoint -> DDP
        args("mhla", 1, *fsdp, "--train-params", "mhla", "--mixing-constraint", "clamp01"),
    ])
    ref = {n: load_file(str(base / "ddp" / "last" / n)) for n in ("model.safetensors", "ema.safetensors")}
    w0 = load_file(str(base / "wan" / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "blocks.0.ffn.net.0.proj.weight"
    assert not torch.equal(w0[key], ref["model.safetensors"][key])  # training moved the weights

    # FSDP == DDP up to fp32 reduction order; the resumed runs equal the straight ones
    for name in ("fsdp", "fsdp_r", "ddp_f", "fsdp_d"):
        for f, r in ref.items():
            _close(load_file(str(base / name / "last" / f)), r, atol=1e-5)
        assert _losses(base / name) == pytest.approx(_losses(base / "ddp"), rel=1e-5)
    for f in ref:
        _close(load_file(str(base / "fsdp_r" / "last" / f)), load_file(str(base / "fsdp" / "last" / f)), atol=0)
    opt = [load_state(base / name / "last" / "state.pt")["optimizer"] for name in ("fsdp", "fsdp_r")]
    assert opt[0]["state"].keys() == opt[1]["state"].keys() and key in opt[0]["state"]  # keyed by name
    assert 0 in load_state(base / "ddp" / "last" / "state.pt")["optimizer"]["state"]  # DDP's: by index
    for k, s in opt[0]["state"].items():
        for n, v in s.items():
            torch.testing.assert_close(v, opt[1]["state"][k][n], rtol=0, atol=0, msg=f"{k}.{n}")

    # final/ and final_ema/ are plain model folders holding the full weights
    from mhla_videogen.model import MHLAWanTransformer3DModel

    for folder, f in (("final", "model.safetensors"), ("final_ema", "ema.safetensors")):
        config = json.loads((base / "fsdp" / folder / "config.json").read_text())
        assert config["_class_name"] == "MHLAWanTransformer3DModel"  # not the FSDP wrapper class
        model = MHLAWanTransformer3DModel.from_pretrained(base / "fsdp" / folder)
        assert model.config.mhla_layers == [1, 2]
        saved = load_file(str(base / "fsdp" / "last" / f))
        _close({k: v for k, v in model.state_dict().items() if k in saved}, saved, atol=0)
    plain = MHLAWanTransformer3DModel.from_pretrained(base / "ddp" / "final")
    load_weights(plain, base / "fsdp" / "last" / "model.safetensors")  # strict: every key, no FSDP prefixes

    # --train-params mhla: frozen weights stay, the mixing matrices are clamped
    w = load_file(str(base / "mhla" / "last" / "model.safetensors"))
    assert torch.equal(w0[key], w[key]) and not torch.equal(w0["blocks.1.attn1.to_q.weight"],
                                                             w["blocks.1.attn1.to_q.weight"])
    mix = w["blocks.1.attn1.block_attn.conv.weight"]
    assert mix.min() >= 0 and mix.max() <= 1


def test_fsdp_flag_single_process(base, capsys):
    out = train.main(_args(base, base / "latents", base / "single", "--max-steps", "1", "--fsdp"))
    assert out["step"] == 1 and "--fsdp ignored" in capsys.readouterr().out


def test_rekey_optimizer_state():
    p = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(p)
    sum(x.sum() for x in p).backward()
    opt.step()
    sd = opt.state_dict()
    by_name = rekey_optimizer_state(sd, ["a", "b"], by_name=True)
    assert set(by_name["state"]) == {"a", "b"} and by_name["param_groups"][0]["params"] == ["a", "b"]
    assert rekey_optimizer_state(by_name, ["a", "b"], by_name=True) is by_name
    back = rekey_optimizer_state(by_name, ["a", "b"], by_name=False)
    assert back["param_groups"] == sd["param_groups"] and back["state"].keys() == sd["state"].keys()
