"""extract (VAE latents + text embeddings, resumable) and train (flow matching, exact resume) on tiny models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mhla_videogen import extract, train
from mhla_videogen.data import batch_indices
from mhla_videogen.objective import flow_sigmas

from .conftest import BLOCKS, make_tiny_pipeline

CONFIGS = Path(__file__).resolve().parents[2] / "mhla_videogen" / "configs"


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):  # shared by this module's tests (they write to separate sub-folders)
    return make_tiny_pipeline(tmp_path_factory.mktemp("videogen_train"))


@pytest.fixture(scope="module")
def latents_dir(tiny_pipeline_dir):
    data = tiny_pipeline_dir / "clips"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (t, h, w) in enumerate([(6, 70, 100), (5, 64, 96), (3, 64, 96), (9, 80, 90)]):
        frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        if i == 3:  # a folder of frame images
            from PIL import Image

            (data / "c3").mkdir()
            for j, f in enumerate(frames):
                Image.fromarray(f).save(data / "c3" / f"{j:03d}.png")
            video = "c3"
        else:
            np.save(data / f"c{i}.npy", frames)
            video = f"c{i}.npy"
        rows.append({"video": video, "caption": ["a cat", "a red dog running", "sky", "the blue wave"][i]})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tiny_pipeline_dir / "latents"
    argv = ["--model", str(tiny_pipeline_dir / "wan"), "--data", str(data), "--out", str(out), "--height", "64",
            "--width", "96", "--frames", "5", "--max-sequence-length", "8", "--device", "cpu"]
    first = extract.main(argv)
    assert first == dict(written=3, skipped_existing=0, too_short=1)  # clip 2 has 3 < 5 frames
    assert extract.main(argv) == dict(written=0, skipped_existing=3, too_short=1)  # resumable: nothing redone
    return out


def test_extract_shapes(latents_dir):
    d = load_file(str(latents_dir / "0000001.safetensors"))
    assert d["latents"].shape == (4, 2, 8, 12)  # z_dim 4, 1 + (5 - 1) / 4 frames, /8 spatial
    assert load_file(str(latents_dir / "0000003.safetensors"))["latents"].shape == (4, 2, 8, 12)  # PNG folder
    assert d["text"].shape[1] == 16 and 1 <= d["text"].shape[0] <= 8
    assert load_file(str(latents_dir / "empty.safetensors"))["text"].shape[1] == 16
    assert json.loads((latents_dir / "meta.json").read_text())["frames"] == 5


def _args(tiny_pipeline_dir, latents_dir, out, *extra):
    return ["--data", str(latents_dir), "--output", str(out),
            "--init-wan", str(tiny_pipeline_dir / "wan" / "transformer"), "--layers", "hybrid",
            "--block-layout", *map(str, BLOCKS), "--batch-size", "2", "--max-sequence-length", "8",
            "--warmup-steps", "2", "--lr", "1e-3", "--log-interval", "1", "--device", "cpu", "--seed", "3", *extra]


def test_train_resume_equals_straight(tiny_pipeline_dir, latents_dir):
    base = tiny_pipeline_dir
    ema = ("--ema-decay", "0.9")
    straight = train.main(_args(base, latents_dir, base / "a", "--max-steps", "3", *ema))
    assert straight["step"] == 3 and np.isfinite(straight["loss"])
    train.main(_args(base, latents_dir, base / "b", "--max-steps", "2", *ema))
    resumed = train.main(_args(base, latents_dir, base / "b", "--max-steps", "3", "--resume", *ema))
    for name in ("last/model.safetensors", "last/ema.safetensors"):
        a, b = load_file(str(base / "a" / name)), load_file(str(base / "b" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ema_w = load_file(str(base / "a" / "last" / "ema.safetensors"))
    a = load_file(str(base / "a" / "last" / "model.safetensors"))
    assert not torch.equal(ema_w["blocks.0.ffn.net.0.proj.weight"], a["blocks.0.ffn.net.0.proj.weight"])
    assert resumed["loss"] == straight["loss"]
    log = [json.loads(line) for line in (base / "b" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3] and {"eta_min", "clips_per_s"} <= log[-1].keys()
    # training moved the weights, and final/ is a model folder that loads
    from mhla_videogen.model import MHLAWanTransformer3DModel

    final = MHLAWanTransformer3DModel.from_pretrained(base / "a" / "final")
    assert final.config.mhla_layers == [1, 2]
    final_ema = MHLAWanTransformer3DModel.from_pretrained(base / "a" / "final_ema")
    torch.testing.assert_close(final_ema.state_dict()["blocks.1.attn1.to_q.weight"],
                               ema_w["blocks.1.attn1.to_q.weight"], rtol=0, atol=0)
    w0 = load_file(str(base / "wan" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(w0["blocks.0.ffn.net.0.proj.weight"], a["blocks.0.ffn.net.0.proj.weight"])


def test_train_only_mhla_params(tiny_pipeline_dir, latents_dir):
    base = tiny_pipeline_dir
    train.main(_args(base, latents_dir, base / "m", "--max-steps", "1", "--train-params", "mhla",
                     "--mixing-constraint", "clamp01", "--no-grad-checkpointing"))
    w = load_file(str(base / "m" / "last" / "model.safetensors"))
    w0 = load_file(str(base / "wan" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(w0["blocks.0.ffn.net.0.proj.weight"], w["blocks.0.ffn.net.0.proj.weight"])
    assert torch.equal(w0["blocks.1.ffn.net.0.proj.weight"], w["blocks.1.ffn.net.0.proj.weight"])
    assert not torch.equal(w0["blocks.1.attn1.to_q.weight"], w["blocks.1.attn1.to_q.weight"])
    mix = w["blocks.1.attn1.block_attn.conv.weight"]
    assert mix.min() >= 0 and mix.max() <= 1


def test_flow_sigmas_and_batches():
    u = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow_sigmas(u, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    # each epoch of a 1-process run visits every sample once
    idx = [i for s in range(3) for i in batch_indices(s, 2, 0, 1, 6, seed=0)]
    assert sorted(idx) == list(range(6))
    # two ranks of one step draw different samples
    assert set(batch_indices(0, 2, 0, 2, 8, 0)).isdisjoint(batch_indices(0, 2, 1, 2, 8, 0))


@pytest.mark.parametrize("name, layers", [("wan_hybrid.yaml", "hybrid"), ("wan_full.yaml", "full")])
def test_configs_parse(name, layers):
    from mhla_core.config import parse_with_config

    args = parse_with_config(train.build_parser(), ["--config", str(CONFIGS / name)])
    assert args.layers == layers and args.lr == 2e-5 and args.adam_eps == 1e-10 and args.clip_grad == 0.1
    assert args.warmup_steps == 1000 and args.caption_dropout == 0.1 and args.mixing_constraint == "none"


def test_train_ddp_two_processes(tiny_pipeline_dir, latents_dir):
    """torchrun with 2 CPU processes (gloo): both ranks step in lockstep and rank 0 writes the checkpoint."""
    import os
    import subprocess
    import sys

    out = tiny_pipeline_dir / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "mhla_videogen.train", *_args(tiny_pipeline_dir, latents_dir, out, "--max-steps", "2")]
    cmd[cmd.index("--batch-size") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=CONFIGS.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2] and "2 steps x 1 x 2" in proc.stdout
    assert (out / "last" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()
