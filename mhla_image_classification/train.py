"""Train a ViT (MHLA, linear or timm's softmax DeiT) on an ImageNet-layout folder.

    python -m mhla_image_classification.train --config mhla_image_classification/configs/mhla_deit_tiny_224.yaml \
        --data-dir /data/imagenet [--output runs/x] [--resume]
    torchrun --nproc_per_node=8 -m mhla_image_classification.train --config ... --data-dir ...

Flags follow the authors' command (timm's train.py names); `--config FILE.yaml` sets defaults and the
command line overrides them. The mixing constraint is applied after every optimiser step.
Checkpoints (`last.safetensors`, `last_ema.safetensors`, `last_state.pt`, `config.yaml`) are written
atomically to --output; `--resume` continues exactly where they stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import ImageDataset, Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import mhla_image_classification  # noqa: F401  (registers the models with timm)
from mhla_core import constrain_mixing
from mhla_core.checkpoint import load_state, load_weights, save_state, save_weights, unwrap
from mhla_core.config import ParseKwargs, dump_yaml, parse_with_config
from mhla_core.distributed import init_distributed, init_wandb, log_metrics
from mhla_image_classification.data import SeededDataset, build_transforms, check_split, eval_loader, train_loader
from mhla_image_classification.evaluate import evaluate
from mhla_image_classification.models import MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML file of defaults (keys are the flag names with underscores)")
    a("--model", default="mhla_deit_tiny_patch16_224")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="e.g. piece_size=4 transform=linear")
    a("--data-dir", default=None)
    a("--train-split", default="train")
    a("--val-split", default="val")
    a("--num-classes", type=int, default=None, help="default: the number of class folders")
    a("--img-size", type=int, default=None, help="input size (default: the model's)")
    a("--gp", default=None, help="global pool override (timm's --gp)")
    a("--opt", default="adamw")
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.05)
    a("--sched", default="cosine")
    a("--epochs", type=int, default=300)
    a("--warmup-epochs", type=int, default=5)
    a("--warmup-lr", type=float, default=1e-6)
    a("--min-lr", type=float, default=1e-5)
    a("--sched-on-updates", action="store_true")
    a("--batch-size", type=int, default=128, help="per process")
    a("--drop-path", type=float, default=0.1)
    a("--aa", default="rand-m9-mstd0.5-inc1", help="auto-augment policy; '' for none")
    a("--color-jitter", type=float, default=0.4)
    a("--reprob", type=float, default=0.25)
    a("--scale-min", type=float, default=0.08, help="random-resized-crop minimum scale")
    a("--hflip", type=float, default=0.5)
    a("--mixup", type=float, default=0.8)
    a("--cutmix", type=float, default=1.0)
    a("--smoothing", type=float, default=0.1)
    a("--model-ema", action="store_true")
    a("--model-ema-decay", type=float, default=0.9998)
    a("--workers", type=int, default=8)
    a("--seed", type=int, default=42)
    a("--output", default=None, help="checkpoint/log folder (default: runs/<experiment or model>)")
    a("--experiment", default=None)
    a("--resume", action="store_true", help="continue from --output's last checkpoint")
    a("--checkpoint-every", type=int, default=0, help="also checkpoint every N updates (0: per epoch only)")
    a("--max-steps", type=int, default=0, help="stop after N updates (0: run all epochs)")
    a("--log-interval", type=int, default=50)
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (0: never)")
    a("--log-wandb", action="store_true", help="log to wandb (offline without credentials)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp-dtype", default="bfloat16", help="autocast dtype on CUDA ('none' for fp32)")
    return p




def build_model(args, num_classes: int) -> nn.Module:
    """timm.create_model with the script's kwargs; a clear error for an unknown name."""
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[-1]}*")[:8] if "_" in args.model else []
        similar = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {args.model!r}; MHLA models: {', '.join(MODEL_NAMES)}; "
                         f"softmax baselines are timm's deit_* names{similar}")
    kwargs = dict(args.model_kwargs)
    if args.img_size and "img_size" not in kwargs:
        kwargs["img_size"] = args.img_size
    if args.gp:
        kwargs["global_pool"] = args.gp
    return timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path, **kwargs)


def _step_seed(seed: int, step: int) -> None:
    """Seed the main-process RNGs (drop path, mixup) from (seed, step): resume replays them exactly."""
    torch.manual_seed(seed * 7919 + step)
    np.random.seed((seed * 7919 + step) % 2**32)


def run(args: argparse.Namespace) -> dict:
    """Train according to `args`; returns the last metrics (also used by the tests and the demo)."""
    rank, world, device = init_distributed(args.device)
    main = rank == 0
    train_root = check_split(args.data_dir or "", args.train_split)
    val_root = Path(args.data_dir) / args.val_split
    base = ImageDataset(str(train_root))
    num_classes = args.num_classes or len(base.reader.class_to_idx)
    out = Path(args.output or Path("runs") / (args.experiment or args.model))
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes).to(device)
    data_cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size else {},
                                   model=model)
    train_tf, eval_tf = build_transforms(data_cfg, args)
    train_ds = SeededDataset(base, train_tf, args.seed)
    updates_per_epoch = len(train_ds) // (args.batch_size * world)
    if updates_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training images are fewer than one batch of {args.batch_size} x {world}")
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=not args.sched_on_updates,
                                       updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                   num_classes=num_classes) if args.mixup > 0 or args.cutmix > 0 else None)
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss())
    step = 0
    if args.resume:
        if not (out / "last_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        state = load_state(out / "last_state.pt")
        load_weights(model, out / "last.safetensors")
        if ema is not None:
            load_weights(ema.module, out / "last_ema.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = (torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype))
           if device.type == "cuda" and args.amp_dtype != "none" else nullcontext())
    total = args.epochs * updates_per_epoch
    total = min(args.max_steps, total) if args.max_steps else total
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml({**vars(args), "num_classes": num_classes}, out / "config.yaml")
        wandb = init_wandb("mhla-classification", args.experiment, out, vars(args)) if args.log_wandb else None
        log = open(out / "log.jsonl", "a")
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params / 1e6:.2f}M params, {len(train_ds)} images, {updates_per_epoch} updates/epoch, "
              f"{total} updates, device {device}, world {world}", flush=True)

    def checkpoint():
        if main:
            save_weights(model, out / "last.safetensors", {"model": args.model})
            if ema is not None:
                save_weights(ema.module, out / "last_ema.safetensors", {"model": args.model})
            save_state({"optimizer": optimizer.state_dict(), "step": step}, out / "last_state.pt")

    metrics: dict = {}
    t0, seen = time.time(), 0
    while step < total:
        epoch, in_epoch = divmod(step, updates_per_epoch)
        loader = train_loader(train_ds, batch_size=args.batch_size, epoch=epoch, seed=args.seed, rank=rank,
                              world=world, workers=args.workers, skip_batches=in_epoch)
        model.train()
        for images, targets in loader:
            _step_seed(args.seed, step)
            scheduler.step_update(num_updates=step) if args.sched_on_updates else scheduler.step(epoch)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with amp:
                loss = criterion(model(images), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at update {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            constrain_mixing(model)
            step += 1
            if ema is not None:
                ema.update(unwrap(model), step=step)
            seen += images.shape[0] * world
            if main and (step % args.log_interval == 0 or step == total):
                rate = seen / (time.time() - t0)
                eta = (total - step) * args.batch_size * world / max(rate, 1e-9)
                metrics = dict(step=step, epoch=epoch, loss=loss.item(), lr=optimizer.param_groups[0]["lr"],
                               img_per_s=round(rate, 1), eta_min=round(eta / 60, 1))
                log_metrics(metrics, log, wandb, step)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoint()
            if step >= total or step % updates_per_epoch == 0:
                break
        epoch_done = step % updates_per_epoch == 0
        if epoch_done or step >= total:
            checkpoint()
        eval_now = step >= total or (epoch_done and args.eval_every and (epoch + 1) % args.eval_every == 0)
        if args.eval_every and val_root.is_dir() and eval_now:
            loader = eval_loader(check_split(args.data_dir, args.val_split), eval_tf, batch_size=args.batch_size,
                                 rank=rank, world=world, workers=args.workers)
            metrics = {**metrics, **evaluate(model, loader, device, amp=amp)}
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, loader, device, amp=amp).items()})
            if main:
                print(json.dumps({"step": step, "epoch": epoch, **metrics}), flush=True)
                log.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
    if main:
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return {**metrics, "step": step, "model": unwrap(model)}




def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
