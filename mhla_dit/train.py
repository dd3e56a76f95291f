"""Train a DiT (MHLA, softmax or linear attention) on a latent store written by `extract_features`.

    python -m mhla_dit.train --config mhla_dit/configs/dit_s2_mhla.yaml --data-path latents/in256
    torchrun --nproc_per_node=8 -m mhla_dit.train --config ... --data-path ... [--resume]

DiT's recipe: AdamW (lr 1e-4, no weight decay, constant), global batch 256, EMA 0.9999 every step, the
hybrid loss (MSE + variational bound, `mhla_dit.diffusion`), uniform timesteps, one of the two stored
views (image or horizontal flip) per sample, bf16 autocast on CUDA. The MHLA mixing constraint is
applied after every optimiser step. `--config FILE.yaml` sets defaults, the command line overrides them
(`--model-kwargs` entries update the config's model_kwargs). The run folder, checkpoints
(`checkpoints/step_N/{model,ema}.safetensors`, `last` links the newest), exact `--resume`, precision,
accumulation and tracking are `mhla_core.training`'s; `--init-from` loads a standard DiT or the authors'
MHLA-DiT checkpoint and reports missing/unexpected keys.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mhla_core import training
from mhla_core.checkpoint import unwrap
from mhla_core.config import ParseKwargs, load_yaml, parse_with_config
from mhla_core.training import nonnegative_int, positive_int
from mhla_dit.checkpoints import init_from, model_metadata
from mhla_dit.data import ImageLatentDataset
from mhla_dit.diffusion import Diffusion
from mhla_dit.models import DiT_models, create_model


def build_parser() -> argparse.ArgumentParser:
    p = training.make_parser(__doc__)
    a = p.add_argument
    a("--model", default="DiT-S/2", choices=list(DiT_models))
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
      help="e.g. attention=softmax block_size=16 normalizer=exact")
    a("--data-path", default=None, help="latent store folder (extract_features --out)")
    a("--epochs", type=positive_int, default=80)
    a("--max-steps", type=nonnegative_int, default=0, help="stop after N updates (0: run all epochs)")
    a("--global-batch-size", type=positive_int, default=256)
    a("--lr", type=float, default=1e-4)
    a("--warmup-steps", type=nonnegative_int, default=0, help="linear lr warm-up over N updates (0: none, as DiT)")
    a("--weight-decay", type=float, default=0.0)
    a("--clip-grad", type=float, default=0.0, help="gradient clipping norm (0: off, as DiT)")
    a("--ema-decay", type=float, default=0.9999)
    a("--no-flip", action="store_true", help="always use view 0 of the store (never the flipped latent)")
    a("--init-from", default=None, help="a standard DiT / MHLA-DiT checkpoint (.pt or .safetensors)")
    a("--keep-every", type=nonnegative_int, default=0, help="keep the checkpoint of every N updates (0: last only)")
    a("--workers", type=nonnegative_int, default=4)
    training.add_training_args(p, checkpoint_every=0, log_interval=100, grad_checkpointing=False)
    return p


def epoch_batches(n: int, epoch: int, seed: int, global_batch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches (last partial dropped)."""
    perm, per_rank = training.epoch_permutation(n, seed, epoch), global_batch // world
    return [list(perm[b * global_batch + rank * per_rank: b * global_batch + (rank + 1) * per_rank])
            for b in range(n // global_batch)]


def model_kwargs(args: argparse.Namespace, meta: dict) -> dict:
    """The model kwargs: the store's latent shape and class count unless the config sets them."""
    C, H, _ = meta["shape"]
    return {"input_size": H, "in_channels": C, "num_classes": meta.get("num_classes", 1000), **args.model_kwargs}


def run(args: argparse.Namespace) -> dict:
    """Train according to `args`; returns the last metrics with the model and EMA (used by tests and drivers)."""
    if not args.data_path:
        raise SystemExit("--data-path (a latent store from `python -m mhla_dit.extract_features`) is required")
    acc = training.make_accelerator(args)
    world, rank = acc.num_processes, acc.process_index
    if acc.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.global_batch_size % (world * args.grad_accum_steps):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes x "
                         f"--grad-accum-steps {args.grad_accum_steps}")
    dataset = ImageLatentDataset(args.data_path)
    updates_per_epoch = len(dataset) // args.global_batch_size
    if updates_per_epoch == 0:
        raise ValueError(f"{len(dataset)} latents are fewer than one --global-batch-size {args.global_batch_size}")
    kwargs = model_kwargs(args, dataset.meta)
    torch.manual_seed(args.seed)
    model = create_model(args.model, **kwargs).to(acc.device)
    if args.grad_checkpointing:
        training.checkpoint_blocks(model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out = training.run_folder(args, args.model.replace("/", "-"))
    frozen = {"model": args.model, "model_kwargs": kwargs, "global_batch_size": args.global_batch_size}
    r = training.start_run(args, acc, out=out, project="mhla-dit",
                           config={**vars(args), "resolved_model_kwargs": kwargs}, frozen=frozen)
    if args.init_from and not args.resume:  # on every rank (the EMA starts from it), reported by one
        report = init_from(model, args.init_from)
        if r.main:
            print(json.dumps({"init_from": str(args.init_from), **report}), flush=True)
    ema = training.EMA(model, args.ema_decay)
    step = r.restore(model=model, optimizer=optimizer, ema=ema)
    model, optimizer = r.prepare(model, optimizer)
    total = args.epochs * updates_per_epoch
    total = min(args.max_steps, total) if args.max_steps else total
    meta = model_metadata(args.model, kwargs, dataset.meta)
    if r.main:
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model} ({kwargs.get('attention', 'mhla')}): {n_params / 1e6:.2f}M params, {len(dataset)} latents,"
              f" {updates_per_epoch} updates/epoch, {total} updates, device {acc.device}, world {world}", flush=True)
    diffusion, views = Diffusion(), dataset.meta.get("views", 1)

    def loss_fn(batch) -> dict[str, torch.Tensor]:
        micro, x, y = batch
        training.seed_step(args.seed, step, rank, micro)
        view = torch.zeros(len(x), dtype=torch.long) if args.no_flip else torch.randint(views, (len(x),))
        x, y = x.to(acc.device)[torch.arange(len(x), device=acc.device), view.to(acc.device)], y.to(acc.device)
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=acc.device)
        losses = diffusion.training_losses(lambda *a: model(*a, return_dict=False)[0], x, t, y)
        return {k: v.mean() for k, v in losses.items()}

    def checkpoint() -> None:
        r.save(step, model=model, optimizer=optimizer, ema=ema, metadata=meta,
               keep=lambda s: bool(args.keep_every) and s % args.keep_every == 0)

    metrics: dict = {}
    sums, count = torch.zeros(3, device=acc.device), 0
    model.train()
    while step < total:
        epoch, in_epoch = divmod(step, updates_per_epoch)
        batches = epoch_batches(len(dataset), epoch, args.seed, args.global_batch_size, rank, world)[in_epoch:]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                            pin_memory=acc.device.type == "cuda")
        for x, y in loader:
            n = args.grad_accum_steps
            micro = list(zip(range(n), x.chunk(n), y.chunk(n)))
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
            stats = training.train_step(r, model, optimizer, micro, loss_fn, clip_grad=args.clip_grad)
            training.constrain(model)
            ema.update(model)
            step += 1
            sums += torch.stack([stats["loss"], stats["mse"], stats["vb"]])
            count += 1
            if step % args.log_interval == 0 or step == total:
                if world > 1:
                    dist.all_reduce(sums)
                avg = (sums / (count * world)).tolist()
                sums.zero_()
                count, (rate, eta) = 0, r.pace(step, total, args.global_batch_size)
                metrics = dict(step=step, epoch=epoch, loss=avg[0], mse=avg[1], vb=avg[2], img_per_s=round(rate, 1),
                               eta_min=eta)
                r.log(metrics, step)
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or (
                    args.keep_every and step % args.keep_every == 0):
                checkpoint()
            if step >= total:
                break
        if not args.checkpoint_every or step >= total:
            checkpoint()
    r.finish()
    return {**metrics, "step": step, "model": unwrap(model), "ema": ema.module(model), "output": out}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if args.config:  # --model-kwargs on the command line update the config's rather than replace them
        args.model_kwargs = {**(load_yaml(args.config).get("model_kwargs") or {}), **args.model_kwargs}
    return run(args)


if __name__ == "__main__":
    main()
