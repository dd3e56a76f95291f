"""Flow-matching fine-tuning of an MHLA Wan transformer on precomputed latents and text embeddings.

    python -m mhla_videogen.train --config mhla_videogen/configs/wan_hybrid.yaml \\
        --init-wan WAN_DIFFUSERS_DIR/transformer --data LATENT_DIR --output runs/wan_hybrid
    torchrun --nproc_per_node 8 -m mhla_videogen.train --config ... (DDP)
    torchrun --nproc_per_node 8 -m mhla_videogen.train --config ... --fsdp (FSDP2: sharded weights and optimizer)

The model is `--init-mhla DIR` (an MHLA model folder) or built from the softmax `--init-wan DIR` with
`--layers hybrid|full` (`from_wan`: every Wan weight reused, MHLA parameters from `--mixing-init`).
LATENT_DIR comes from `python -m mhla_videogen.extract`.

Objective (the authors'): x_t = (1 - s) x0 + s eps, target eps - x0, MSE, s = shift u / (1 + (shift - 1) u) with
u = sigmoid(N(logit_mean, logit_std)) and shift = `--flow-shift` (3); the transformer sees timestep 1000 s.
AdamW (lr 2e-5, eps 1e-10, wd 0), constant after `--warmup-steps` linear warm-up, gradient clipping 0.1, bf16
autocast on CUDA, gradient checkpointing, caption dropout 0.1 to the empty-prompt embedding.

Exact resume: every random draw of step `i` (batch order, noise, s, dropout) comes from generators seeded by
(seed, step, rank), so `--resume` continues bit-for-bit. `{output}/last.safetensors` + `last_state.pt` are
written atomically every `--checkpoint-every` steps and at the end, `{output}/final/` is a model folder for
`python -m mhla_videogen.generate --transformer` (`final_ema/` too with `--ema-decay`). Metrics go to stdout,
`{output}/log.jsonl` and, with `--log-wandb`, wandb.

`--fsdp` (world > 1) shards every transformer block and then the root with FSDP2 `fully_shard` instead of
wrapping the model in DDP. Checkpoints are still full, unsharded state dicts (the optimizer state keyed by
parameter name), so either path resumes from the other's checkpoints and `final/` loads without FSDP.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mhla_core.checkpoint import load_state, load_weights, save_state, save_weights, unwrap
from mhla_core.config import dump_yaml, parse_with_config
from mhla_core.distributed import init_distributed, init_wandb, log_metrics

MIXING_CONSTRAINTS = ("none", "clamp01")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mhla_videogen.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML of argument defaults (the command line wins)")
    a("--data", default=None, help="folder from python -m mhla_videogen.extract")
    a("--output", default="runs/wan_mhla")
    a("--init-wan", default=None, help="softmax Wan transformer folder (converted with from_wan)")
    a("--init-mhla", default=None, help="MHLA transformer folder (continue fine-tuning)")
    a("--layers", default="hybrid", help="hybrid | full (with --init-wan)")
    a("--block-layout", type=int, nargs=3, default=[3, 5, 10])
    a("--gated", action="store_true", help="add the output gate (the authors' committed code trains ungated)")
    a("--mixing-init", default="distance", choices=["distance", "reference"])
    a("--train-params", default="all", choices=["all", "mhla"], help="all parameters, or only the MHLA layers'")
    a("--mixing-constraint", default="none", choices=MIXING_CONSTRAINTS, help="none (the authors) or clamp01")
    a("--batch-size", type=int, default=4, help="per process")
    a("--max-steps", type=int, default=10000)
    a("--lr", type=float, default=2e-5)
    a("--adam-eps", type=float, default=1e-10)
    a("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=1000)
    a("--grad-clip", type=float, default=0.1)
    a("--flow-shift", type=float, default=3.0)
    a("--logit-mean", type=float, default=0.0)
    a("--logit-std", type=float, default=1.0)
    a("--caption-dropout", type=float, default=0.1)
    a("--max-sequence-length", type=int, default=512, help="text embeddings are zero-padded to this length")
    a("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16", "none"], help="autocast on CUDA")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    a("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (e.g. 0.9999); 0 = off")
    a("--fsdp", action="store_true",
      help="under torchrun (world > 1): shard weights, gradients, optimizer state and EMA with FSDP2 instead of "
           "DDP; on CUDA the gathered weights are in --amp-dtype (fp32 with --amp-dtype none) and gradients are "
           "reduced in fp32. Ignored, with a notice, in a single process")
    a("--log-wandb", action="store_true", help="log to wandb (offline without credentials)")
    a("--seed", type=int, default=0)
    a("--log-interval", type=int, default=10)
    a("--checkpoint-every", type=int, default=500)
    a("--resume", action="store_true", help="continue from {output}/last_state.pt")
    a("--device", default=None)
    return p


# ---------------------------------------------------------------------------------------------------- data
class LatentDataset:
    """The `{index}.safetensors` files of an extract folder: (latents [C, f, h, w], text [L, D])."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"latent folder {self.root} does not exist (run python -m mhla_videogen.extract)")
        self.files = sorted(p for p in self.root.glob("*.safetensors") if p.stem.isdigit())
        if not self.files:
            raise FileNotFoundError(f"no samples in {self.root}")
        if not (self.root / "empty.safetensors").is_file():
            raise FileNotFoundError(f"{self.root}/empty.safetensors (the empty-prompt embedding) is missing")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        d = load_file(str(self.files[i]))
        return d["latents"], d["text"]

    def empty_text(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / "empty.safetensors"))["text"]


def pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """[L, D] -> [length, D], zero rows appended (WanPipeline's padding), truncated if longer."""
    text = text[:length]
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])])


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, batch: int, rank: int, world: int, n: int, seed: int) -> list[int]:
    """Sample indices of (step, rank): a fresh permutation per epoch, seeded by (seed, epoch)."""
    out = []
    for j in range(batch):
        epoch, pos = divmod((step * world + rank) * batch + j, n)
        out.append(int(_epoch_perm(n, seed, epoch)[pos]))
    return out


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Shifted flow-matching noise level: s = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def make_batch(ds: LatentDataset, empty: torch.Tensor, step: int, args, rank: int, world: int):
    """(x_t, timestep, text, target) for `step` on `rank`; every draw seeded by (seed, step, rank)."""
    idx = batch_indices(step, args.batch_size, rank, world, len(ds), args.seed)
    items = [ds[i] for i in idx]
    x0 = torch.stack([lat.float() for lat, _ in items])
    g = torch.Generator().manual_seed((args.seed * 7919 + step) * 4099 + rank)
    drop = torch.rand(len(items), generator=g) < args.caption_dropout
    text = torch.stack([pad_text(empty if d else t, args.max_sequence_length).float()
                        for (_, t), d in zip(items, drop)])
    eps = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(len(items), generator=g))
    s = flow_sigmas(u, args.flow_shift)
    sv = s.view(-1, 1, 1, 1, 1)
    return (1 - sv) * x0 + sv * eps, s * 1000.0, text, eps - x0


# ---------------------------------------------------------------------------------------------------- model
def build_model(args) -> nn.Module:
    from mhla_videogen.model import MHLAWanTransformer3DModel

    if bool(args.init_wan) == bool(args.init_mhla):
        raise SystemExit("give exactly one of --init-wan (softmax Wan folder) or --init-mhla (MHLA folder)")
    if args.init_mhla:
        if not (Path(args.init_mhla) / "config.json").is_file():
            raise SystemExit(f"--init-mhla {args.init_mhla} is not an MHLA model folder (config.json missing)")
        return MHLAWanTransformer3DModel.from_pretrained(args.init_mhla, local_files_only=True, dtype=torch.float32)
    from mhla_videogen.convert import from_wan

    if not (Path(args.init_wan) / "config.json").is_file():
        raise SystemExit(f"--init-wan {args.init_wan} is not a local transformer folder (config.json missing); "
                         "fetch Wan-AI/Wan2.1-T2V-1.3B-Diffusers and pass its transformer/ folder")
    return from_wan(args.init_wan, layers=args.layers, gated=args.gated, mixing_init=args.mixing_init,
                    block_layout=tuple(args.block_layout), torch_dtype=torch.float32)


def select_trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """`all`, or `mhla`: every parameter of the MHLA attention modules (q/k/v/o, norms, g, g_norm, W)."""
    if which == "all":
        return [p for p in model.parameters()]
    keep = {id(p) for attn in model.mhla_attentions.values() for p in attn.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of every floating-point tensor of a model's state dict (fp32, on its device)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The shadow as full CPU tensors; sharded (FSDP) entries are all-gathered, so every rank must call it."""
        return {k: _full_tensor(v).cpu().contiguous() for k, v in self.shadow.items()}

    def save(self, path: Path, step: int, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write `state` (default: `full_state()`) as safetensors, atomically."""
        from safetensors.torch import save_file

        from mhla_core.checkpoint import atomic_write

        state = self.full_state() if state is None else state
        meta = {"step": str(step), "decay": str(self.decay)}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        if not any(_is_dtensor(v) for v in self.shadow.values()):
            for k, v in load_file(str(path)).items():
                self.shadow[k].copy_(v)
            return
        # sharded: rank 0 reads the file and scatters (DTensors) or broadcasts (buffers) every entry
        from torch.distributed.tensor import distribute_tensor

        full = load_file(str(path)) if dist.get_rank() == 0 else {}
        for k, v in self.shadow.items():
            src = (full[k] if full else torch.empty(v.shape, dtype=v.dtype)).to(v.device)
            if _is_dtensor(v):
                v.copy_(distribute_tensor(src, v.device_mesh, v.placements, src_data_rank=0))
            else:
                dist.broadcast(src, 0)
                v.copy_(src)


@torch.no_grad()
def constrain_mixing(model: nn.Module, kind: str) -> None:
    """The mixing constraint on every MHLA layer's W (`clamp01`), or nothing (`none`, the authors)."""
    if kind == "clamp01":
        for attn in unwrap(model).mhla_attentions.values():
            attn.block_attn.conv.weight.clamp_(0.0, 1.0)




# ---------------------------------------------------------------------------------------------------- FSDP
def _is_dtensor(t: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, all-gathered if it is a DTensor (a collective: every rank calls it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_model(model: nn.Module, device: torch.device, amp_dtype: str) -> nn.Module:
    """FSDP2 over all ranks: `fully_shard` each of `model.blocks`, then the root (the remaining parameters).

    On CUDA (unless `amp_dtype` is "none") the all-gathered weights are in `amp_dtype` and gradients are reduced
    in fp32; the sharded master weights stay fp32. Forward inputs are not cast (autocast picks the op dtypes as
    with DDP, and the rotary tuple that carries the token grid passes through untouched)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if device.type == "cuda" and amp_dtype != "none":
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, amp_dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def rekey_optimizer_state(state: dict, names: list[str], by_name: bool) -> dict:
    """An optimizer state dict re-keyed by parameter name (`by_name`, the FSDP checkpoints) or by index (the
    format of `Optimizer.state_dict`); `names` are the optimizer's parameters in order. Returned as is if
    already keyed that way."""
    params = [p for group in state["param_groups"] for p in group["params"]]
    if not params or isinstance(params[0], str) == by_name:
        return state
    key = dict(enumerate(names)) if by_name else {n: i for i, n in enumerate(names)}
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]]}


def param_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Names of `params` in `model`, in order."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for p in params]


def fsdp_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of a sharded model as full CPU state dicts on rank 0 (empty elsewhere); the
    optimizer state is keyed by parameter name. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def fsdp_load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Load full state dicts (read on rank 0; `{}` elsewhere) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


def run(args: argparse.Namespace) -> dict:
    rank, world, device = init_distributed(args.device)
    main = rank == 0
    fsdp = args.fsdp and world > 1
    if args.fsdp and not fsdp:
        print("--fsdp ignored: a single process trains the unsharded model", flush=True)
    if args.data is None:
        raise SystemExit("--data (a folder from python -m mhla_videogen.extract) is required")
    ds = LatentDataset(args.data)
    empty = ds.empty_text()
    out = Path(args.output)
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = select_trainable(model, args.train_params)
    model_cls = type(model)
    if fsdp:  # fully_shard swaps in sharded (DTensor) parameters: the optimizer takes those
        model = shard_model(model, device, args.amp_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    names = param_names(model, params)
    step = 0
    ema = EMA(model, args.ema_decay) if args.ema_decay else None
    if args.resume:
        if not (out / "last_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        if fsdp:  # rank 0 reads the full checkpoint, every rank keeps its shard
            from safetensors.torch import load_file

            state = load_state(out / "last_state.pt") if main else {}
            weights = load_file(str(out / "last.safetensors")) if main else {}
            optim = rekey_optimizer_state(state["optimizer"], names, by_name=True) if main else {}
            fsdp_load_full_state(model, optimizer, weights, optim)
            del weights, optim
            box = [state.get("step")]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
        else:
            state = load_state(out / "last_state.pt")
            load_weights(model, out / "last.safetensors")
            optimizer.load_state_dict(rekey_optimizer_state(state["optimizer"], names, by_name=False))
            step = state["step"]
        if ema is not None:
            ema.load(out / "last_ema.safetensors")
    if world > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = (torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype))
           if device.type == "cuda" and args.amp_dtype != "none" else nullcontext())
    total = args.max_steps
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(vars(args), out / "config.yaml")
        log = open(out / "log.jsonl", "a")
        wandb = init_wandb("mhla-videogen", out.name, out, vars(args)) if args.log_wandb else None
        n_all = sum(p.numel() for p in unwrap(model).parameters())
        n_train = sum(p.numel() for p in params)
        print(f"MHLA Wan ({unwrap(model).config.mhla_layers} MHLA layers): {n_all / 1e6:.1f}M params, "
              f"{n_train / 1e6:.1f}M trained, {len(ds)} clips, {total} steps x {args.batch_size} x {world}, "
              f"device {device}" + (", FSDP" if fsdp else ""), flush=True)

    def checkpoint() -> tuple[dict, dict | None]:
        """Write last.safetensors, last_state.pt (and last_ema.safetensors). Under FSDP every rank takes part and
        rank 0 gets the full weights and EMA weights back."""
        if fsdp:
            from safetensors.torch import save_file

            from mhla_core.checkpoint import atomic_write

            weights, optim = fsdp_full_state(model, optimizer)
            shadow = ema.full_state() if ema is not None else None
            if main:
                weights = {k: v.contiguous() for k, v in weights.items()}
                atomic_write(out / "last.safetensors",
                             lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))
                if ema is not None:
                    ema.save(out / "last_ema.safetensors", step, shadow)
                save_state({"optimizer": optim, "step": step}, out / "last_state.pt")
            return weights, shadow
        if main:
            save_weights(model, out / "last.safetensors", {"step": str(step)})
            if ema is not None:
                ema.save(out / "last_ema.safetensors", step)
            save_state({"optimizer": optimizer.state_dict(), "step": step}, out / "last_state.pt")
        return {}, None if ema is None else ema.shadow

    metrics: dict = {}
    t0, start = time.time(), step
    model.train()
    while step < total:
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        x_t, t, text, target = (v.to(device, non_blocking=True)
                                for v in make_batch(ds, empty, step, args, rank, world))
        with amp:
            pred = model(hidden_states=x_t, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip else torch.tensor(0.0)
        grad_norm = _full_tensor(grad_norm)  # FSDP: a DTensor of the global norm
        optimizer.step()
        constrain_mixing(model, args.mixing_constraint)
        if ema is not None:
            ema.update(unwrap(model))
        step += 1
        log_now = step % args.log_interval == 0 or step == total
        loss_mean = loss.detach().clone()
        if world > 1 and log_now:  # every rank takes part; rank 0 logs the mean over ranks
            dist.all_reduce(loss_mean, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            loss_mean = loss_mean if device.type == "cuda" else loss_mean / world
        if main and log_now:
            rate = (step - start) / (time.time() - t0)
            metrics = dict(step=step, loss=round(loss_mean.item(), 6), grad_norm=round(float(grad_norm), 4), lr=lr,
                           steps_per_s=round(rate, 4), clips_per_s=round(rate * args.batch_size * world, 3),
                           eta_min=round((total - step) / max(rate, 1e-9) / 60, 1))
            log_metrics(metrics, log, wandb, step)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint()
    weights, shadow = checkpoint()
    final = unwrap(model)
    if main:
        if fsdp:  # save from an unsharded copy of the model (rank 0 only)
            final = model_cls.from_config(final.config)
            final.load_state_dict(weights, assign=True)
        final.save_pretrained(out / "final")
        if ema is not None:  # final_ema/: the same model with the EMA weights
            backup = {k: v.detach().clone() for k, v in final.state_dict().items() if k in shadow}
            final.load_state_dict({k: v.to(backup[k].dtype) for k, v in shadow.items()}, strict=False)
            final.save_pretrained(out / "final_ema")
            final.load_state_dict(backup, strict=False)
        log.close()
        if wandb:
            wandb.finish()
    if world > 1:
        dist.destroy_process_group()
    return {**metrics, "step": step, "model": final}  # under FSDP: rank 0's unsharded copy




def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if math.isnan(args.lr) or args.batch_size < 1:
        raise SystemExit("bad --lr or --batch-size")
    return run(args)


if __name__ == "__main__":
    main()
