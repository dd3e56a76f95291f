"""Train a ViT (MHLA, linear or timm's softmax DeiT) on an ImageNet-layout folder.

    python -m mhla_image_classification.train --config mhla_image_classification/configs/mhla_deit_tiny_224.yaml \
        --data-dir /data/imagenet [--output runs/x] [--resume]
    torchrun --nproc_per_node=8 -m mhla_image_classification.train --config ... --data-dir ...

Flags follow the authors' command (timm's train.py names, `--amp`, `--torchcompile`, `--clip-grad`,
`--initial-checkpoint` included); `--config FILE.yaml` sets defaults and the command line overrides them.
The mixing constraint is applied after every optimiser step. The run folder, checkpoints
(`last/{model,ema}.safetensors` with `last/config.yaml`, which records the class names), exact `--resume`,
precision, accumulation and tracking are `mhla_core.training`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import ImageDataset, Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import mhla_image_classification  # noqa: F401  (registers the models with timm)
from mhla_core import training
from mhla_core.checkpoint import unwrap
from mhla_core.config import ParseKwargs, parse_with_config
from mhla_core.training import nonnegative_int, positive_int
from mhla_image_classification.data import SeededDataset, build_transforms, check_split, eval_loader, train_loader
from mhla_image_classification.evaluate import evaluate
from mhla_image_classification.models import MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = training.make_parser(__doc__)
    a = p.add_argument
    a("--model", default="mhla_deit_tiny_patch16_224")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="e.g. piece_size=4 transform=linear")
    a("--data-dir", default=None)
    a("--train-split", default="train")
    a("--val-split", default="val")
    a("--num-classes", type=positive_int, default=None, help="default: the number of class folders")
    a("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    a("--gp", default=None, help="global pool override (timm's --gp)")
    a("--initial-checkpoint", default=None, help="weights to start from (timm's; not with --resume)")
    a("--opt", default="adamw")
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.05)
    a("--clip-grad", type=float, default=0.0, help="gradient clipping norm (0: off)")
    a("--sched", default="cosine")
    a("--epochs", type=positive_int, default=300)
    a("--warmup-epochs", type=nonnegative_int, default=5)
    a("--warmup-lr", type=float, default=1e-6)
    a("--min-lr", type=float, default=1e-5)
    a("--sched-on-updates", action="store_true")
    a("--batch-size", type=positive_int, default=128, help="per process and micro-batch")
    a("--drop", type=float, default=0.0, help="dropout rate")
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
    a("--workers", type=nonnegative_int, default=8)
    a("--max-steps", type=nonnegative_int, default=0, help="stop after N updates (0: run all epochs)")
    a("--eval-every", type=nonnegative_int, default=1, help="evaluate every N epochs (0: never)")
    a("--amp", action="store_true", help="timm's spelling: mixed precision (on by default here; see --amp-dtype)")
    training.add_training_args(p, seed=42, checkpoint_every=0, log_interval=50, grad_checkpointing=False,
                               timm_spelling=True)
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
    return timm.create_model(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                             **kwargs)


def run(args: argparse.Namespace) -> dict:
    """Train according to `args`; returns the last metrics (also used by the tests and the demo)."""
    acc = training.make_accelerator(args)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    base = ImageDataset(str(check_split(args.data_dir or "", args.train_split)))
    classes = sorted(base.reader.class_to_idx, key=base.reader.class_to_idx.get)
    if args.num_classes is not None and args.num_classes < len(classes):
        raise ValueError(f"--num-classes {args.num_classes} is fewer than the {len(classes)} class folders of "
                         f"{args.data_dir}/{args.train_split}; pass at least {len(classes)} or leave it out")
    num_classes = args.num_classes or len(classes)
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.initial_checkpoint and not args.resume:
        timm.models.load_checkpoint(model, args.initial_checkpoint)
    data_cfg = resolve_data_config({"input_size": (3, args.img_size, args.img_size)} if args.img_size else {},
                                   model=model)
    train_tf, eval_tf = build_transforms(data_cfg, args)
    train_ds = SeededDataset(base, train_tf, args.seed)
    per_rank = args.batch_size * args.grad_accum_steps
    updates_per_epoch = len(train_ds) // (per_rank * world)
    if updates_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training images are fewer than one --batch-size {args.batch_size} x "
                         f"--grad-accum-steps {args.grad_accum_steps} x {world} processes")
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=not args.sched_on_updates,
                                       updates_per_epoch=updates_per_epoch)
    ema = training.EMA(model, args.model_ema_decay) if args.model_ema else None
    mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                   num_classes=num_classes) if args.mixup > 0 or args.cutmix > 0 else None)
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss())
    out = training.run_folder(args, args.model)
    frozen = {k: getattr(args, k) for k in ("model", "model_kwargs", "img_size", "gp", "opt")}
    r = training.start_run(args, acc, out=out, project="mhla-classification",
                           config={**vars(args), "num_classes": num_classes, "class_names": classes},
                           frozen={**frozen, "num_classes": num_classes, "global_batch": per_rank * world})
    step = r.restore(model=model, optimizer=optimizer, ema=ema, scheduler=scheduler)
    model, optimizer = r.prepare(model, optimizer)
    total = args.epochs * updates_per_epoch
    total = min(args.max_steps, total) if args.max_steps else total
    if r.main:
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params / 1e6:.2f}M params, {len(train_ds)} images, {updates_per_epoch} updates/epoch, "
              f"{total} updates, device {device}, world {world}", flush=True)

    def loss_fn(batch) -> dict[str, torch.Tensor]:
        micro, images, targets = batch
        training.seed_step(args.seed, step, rank, micro)  # drop path and mixup draws
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        return {"loss": criterion(model(images), targets)}

    metrics: dict = {}
    while step < total:
        epoch, in_epoch = divmod(step, updates_per_epoch)
        loader = train_loader(train_ds, batch_size=per_rank, epoch=epoch, seed=args.seed, rank=rank, world=world,
                              workers=args.workers, skip_batches=in_epoch)
        model.train()
        for images, targets in loader:
            scheduler.step_update(num_updates=step) if args.sched_on_updates else scheduler.step(epoch)
            n = args.grad_accum_steps
            micro = list(zip(range(n), images.chunk(n), targets.chunk(n)))
            stats = training.train_step(r, model, optimizer, micro, loss_fn, clip_grad=args.clip_grad)
            training.constrain(model)
            step += 1
            if ema is not None:
                ema.update(model)
            if step % args.log_interval == 0 or step == total:
                rate, eta = r.pace(step, total, per_rank * world)
                metrics = dict(step=step, epoch=epoch, loss=stats["loss"].item(), lr=optimizer.param_groups[0]["lr"],
                               img_per_s=round(rate, 1), eta_min=eta)
                r.log(metrics, step)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                r.save(step, model=model, optimizer=optimizer, ema=ema, scheduler=scheduler)
            if step >= total or step % updates_per_epoch == 0:
                break
        epoch_done = step % updates_per_epoch == 0
        if epoch_done or step >= total:
            r.save(step, model=model, optimizer=optimizer, ema=ema, scheduler=scheduler)
        eval_now = step >= total or (epoch_done and args.eval_every and (epoch + 1) % args.eval_every == 0)
        if args.eval_every and (Path(args.data_dir) / args.val_split).is_dir() and eval_now:
            loader = eval_loader(check_split(args.data_dir, args.val_split), eval_tf, batch_size=args.batch_size,
                                 rank=rank, world=world, workers=args.workers, class_names=classes)
            with acc.autocast():
                metrics = {**metrics, **evaluate(model, loader, device)}
                if ema is not None:
                    metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module(model), loader, device).items()})
            r.log({"step": step, "epoch": epoch, **metrics}, step)
    r.finish()
    return {**metrics, "step": step, "model": unwrap(model)}


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
