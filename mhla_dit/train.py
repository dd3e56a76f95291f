"""Train a DiT (MHLA, softmax or linear attention) on a latent store written by `extract_features`.

    python -m mhla_dit.train --config mhla_dit/configs/dit_s2_mhla.yaml --data-path latents/in256
    torchrun --nproc_per_node=8 -m mhla_dit.train --config ... --data-path ... [--resume]

DiT's recipe: AdamW (lr 1e-4, no weight decay, constant), global batch 256, EMA 0.9999 every step, the
hybrid loss (MSE + variational bound, `mhla_dit.diffusion`), uniform timesteps, one of the two stored
views (image or horizontal flip) per sample, bf16 autocast on CUDA. The MHLA mixing constraint is
applied after every optimiser step. `--config FILE.yaml` sets defaults, the command line overrides them
(`--model-kwargs` entries update the config's model_kwargs).
Checkpoints (`last.safetensors`, `last_ema.safetensors`, `last_state.pt`, `config.yaml`) are written
atomically to --output; `--resume` continues exactly (every step is seeded from (seed, step, rank));
`--init-from` loads a standard DiT or authors' MHLA-DiT checkpoint and reports missing/unexpected keys.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from mhla_core import constrain_mixing
from mhla_core.checkpoint import load_state, load_weights, save_state, save_weights, unwrap
from mhla_core.config import ParseKwargs, dump_yaml, load_yaml, parse_with_config
from mhla_core.distributed import init_distributed, init_wandb, log_metrics
from mhla_dit.checkpoints import init_from, model_metadata
from mhla_dit.data import LatentDataset
from mhla_dit.diffusion import Diffusion
from mhla_dit.models import DiT_models, create_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML file of defaults (keys are the flag names with underscores)")
    a("--model", default="DiT-S/2", choices=list(DiT_models))
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
      help="e.g. attention=softmax block_size=16 normalizer=exact")
    a("--data-path", required=False, default=None, help="latent store folder (extract_features --out)")
    a("--epochs", type=int, default=80)
    a("--max-steps", type=int, default=0, help="stop after N updates (0: run all epochs)")
    a("--global-batch-size", type=int, default=256)
    a("--lr", type=float, default=1e-4)
    a("--warmup-steps", type=int, default=0, help="linear lr warm-up over N updates (0: none, as DiT)")
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: off, as DiT)")
    a("--ema-decay", type=float, default=0.9999)
    a("--no-flip", action="store_true", help="always use view 0 of the store (never the flipped latent)")
    a("--seed", type=int, default=0)
    a("--output", default=None, help="checkpoint/log folder (default: runs/<experiment or model>)")
    a("--experiment", default=None)
    a("--resume", action="store_true", help="continue from --output's last checkpoint")
    a("--init-from", default=None, help="a standard DiT / MHLA-DiT checkpoint (.pt or .safetensors)")
    a("--checkpoint-every", type=int, default=0, help="checkpoint every N updates (0: each epoch's end) and at the end")
    a("--keep-every", type=int, default=0, help="keep a copy of the EMA weights every N updates (0: never)")
    a("--log-interval", type=int, default=100)
    a("--workers", type=int, default=4)
    a("--log-wandb", action="store_true", help="log to wandb (offline without credentials)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp-dtype", default="bfloat16", help="autocast dtype on CUDA ('none' for fp32)")
    return p




def epoch_batches(n: int, epoch: int, seed: int, global_batch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches (last partial dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = global_batch // world
    return [perm[b * global_batch + rank * per_rank: b * global_batch + (rank + 1) * per_rank]
            for b in range(n // global_batch)]


def model_kwargs(args: argparse.Namespace, meta: dict) -> dict:
    """The model kwargs: the store's latent shape and class count unless the config sets them."""
    C, H, _ = meta["shape"]
    return {"input_size": H, "in_channels": C, "num_classes": meta.get("num_classes", 1000), **args.model_kwargs}


def run(args: argparse.Namespace) -> dict:
    """Train according to `args`; returns the last metrics with the model and EMA (used by tests and drivers)."""
    if not args.data_path:
        raise SystemExit("--data-path (a latent store from `python -m mhla_dit.extract_features`) is required")
    rank, world, device = init_distributed(args.device)
    main = rank == 0
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dataset = LatentDataset(args.data_path)
    updates_per_epoch = len(dataset) // args.global_batch_size
    if updates_per_epoch == 0:
        raise ValueError(f"{len(dataset)} latents are fewer than one global batch of {args.global_batch_size}")
    out = Path(args.output or Path("runs") / (args.experiment or args.model.replace("/", "-")))
    kwargs = model_kwargs(args, dataset.meta)
    torch.manual_seed(args.seed)
    model = create_model(args.model, **kwargs).to(device)
    diffusion = Diffusion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if args.init_from and not args.resume:
        report = init_from(model, args.init_from)
        if main:
            print(json.dumps({"init_from": str(args.init_from), **report}), flush=True)
    ema = ModelEmaV3(model, decay=args.ema_decay)
    if args.resume:
        if not (out / "last_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        state = load_state(out / "last_state.pt")
        load_weights(model, out / "last.safetensors")
        load_weights(ema.module, out / "last_ema.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = (torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype))
           if device.type == "cuda" and args.amp_dtype != "none" else nullcontext())

    def forward(xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with amp:
            return model(xt, t, y)

    total = args.epochs * updates_per_epoch
    total = min(args.max_steps, total) if args.max_steps else total
    meta = model_metadata(args.model, kwargs, dataset.meta)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml({**vars(args), "resolved_model_kwargs": kwargs}, out / "config.yaml")
        wandb = init_wandb("mhla-dit", args.experiment, out, vars(args)) if args.log_wandb else None
        log = open(out / "log.jsonl", "a")
        n_params = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
        print(f"{args.model} ({kwargs.get('attention', 'mhla')}): {n_params / 1e6:.2f}M params, "
              f"{len(dataset)} latents, {updates_per_epoch} updates/epoch, {total} updates, device {device}, "
              f"world {world}", flush=True)

    def checkpoint() -> None:
        if main:
            save_weights(model, out / "last.safetensors", meta)
            save_weights(ema.module, out / "last_ema.safetensors", meta)
            save_state({"optimizer": optimizer.state_dict(), "step": step}, out / "last_state.pt")
            if args.keep_every and step % args.keep_every == 0:
                save_weights(ema.module, out / f"ema_{step:07d}.safetensors", meta)

    views = dataset.meta.get("views", 1)
    metrics: dict = {}
    sums = torch.zeros(3, device=device)
    count, t0, seen = 0, time.time(), 0
    model.train()
    while step < total:
        epoch, in_epoch = divmod(step, updates_per_epoch)
        batches = epoch_batches(len(dataset), epoch, args.seed, args.global_batch_size, rank, world)[in_epoch:]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            torch.manual_seed((args.seed * 1_000_003 + step) * 1009 + rank)
            view = torch.zeros(len(x), dtype=torch.long) if args.no_flip else torch.randint(views, (len(x),))
            x = x.to(device, non_blocking=True)[torch.arange(len(x), device=device), view.to(device)]
            y = y.to(device, non_blocking=True)
            t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device)
            losses = diffusion.training_losses(forward, x, t, y)
            loss = losses["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            if args.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            constrain_mixing(model)
            ema.update(unwrap(model))
            step += 1
            sums += torch.stack([loss.detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()])
            count += 1
            seen += len(x) * world
            if step % args.log_interval == 0 or step == total:
                if world > 1:
                    dist.all_reduce(sums)
                avg = (sums / (count * world)).tolist()
                if not all(map(math.isfinite, avg)):  # checked here, not every step: no host sync per update
                    raise FloatingPointError(f"non-finite loss {avg} in the {count} updates up to {step}")
                sums.zero_()
                count = 0
                if main:
                    rate = seen / (time.time() - t0)
                    eta = (total - step) * args.global_batch_size / max(rate, 1e-9)
                    metrics = dict(step=step, epoch=epoch, loss=avg[0], mse=avg[1], vb=avg[2],
                                   img_per_s=round(rate, 1), eta_min=round(eta / 60, 1))
                    log_metrics(metrics, log, wandb, step)
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or (
                    args.keep_every and step % args.keep_every == 0):
                checkpoint()
            if step >= total:
                break
        if not args.checkpoint_every or step >= total:
            checkpoint()
    if main:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return {**metrics, "step": step, "model": unwrap(model), "ema": ema.module, "output": out}




def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if args.config:  # --model-kwargs on the command line update the config's rather than replace them
        args.model_kwargs = {**(load_yaml(args.config).get("model_kwargs") or {}), **args.model_kwargs}
    return run(args)


if __name__ == "__main__":
    main()
