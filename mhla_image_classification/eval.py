"""Evaluate a checkpoint (top-1/top-5 on a validation folder), or measure throughput.

    python -m mhla_image_classification.eval --checkpoint runs/x/last/ema.safetensors --data-dir /data/imagenet
    python -m mhla_image_classification.eval --throughput --models mhla_deit_tiny_patch16_224 deit_tiny_patch16_224

A checkpoint is read with the `config.yaml` its training run wrote beside it (model name, kwargs, class names);
validation labels are mapped by class name, and a split whose class folders differ is refused.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

import mhla_image_classification  # noqa: F401  (registers the models with timm)
from mhla_core.checkpoint import load_weights
from mhla_core.compile import add_compile_args, compile_model, compile_settings
from mhla_core.config import ParseKwargs, load_yaml
from mhla_image_classification.data import build_transforms, check_split, eval_loader
from mhla_image_classification.evaluate import evaluate
from mhla_image_classification.models import MHLA_DEFAULTS, attention_of

MHLA_KWARGS = {*MHLA_DEFAULTS, "pad_image", "lepe_kernel"}  # dropped for models this package does not register


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a .safetensors file written by train.py")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--throughput", action="store_true", help="measure images/s instead of accuracy")
    p.add_argument("--models", nargs="*", default=["mhla_deit_tiny_patch16_224", "deit_tiny_patch16_224"])
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=30, help="timed batches per model in --throughput")
    p.add_argument("--train", action="store_true", help="--throughput of training steps instead of inference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_compile_args(p, timm_spelling=True)
    return p


def _amp(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a training run from its config.yaml and load the weights."""
    path = Path(path)
    cfg_path = path.parent / "config.yaml"
    if not path.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"need {path} and {cfg_path} (written by train.py)")
    cfg = load_yaml(cfg_path)
    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("img_size") and "img_size" not in kwargs:
        kwargs["img_size"] = cfg["img_size"]
    if cfg.get("gp"):
        kwargs["global_pool"] = cfg["gp"]
    model = timm.create_model(cfg["model"], num_classes=cfg["num_classes"], **kwargs)
    load_weights(model, path)
    return model, cfg


def _images_per_second(model: torch.nn.Module, x: torch.Tensor, device: torch.device, steps: int,
                       train: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6) if train else None

    def step():
        with _amp(device):
            out = model(x)
        if opt is not None:
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    with torch.set_grad_enabled(train):
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return x.shape[0] * steps / (time.perf_counter() - t0)


def throughput(names: Sequence[str], batch_size: int, device: torch.device, steps: int, img_size: int | None,
               model_kwargs: dict, train: bool = False,
               compile_with: tuple[str, str, str | None] = ("none", "inductor", None)) -> list[dict]:
    """Images per second (bf16 autocast on CUDA) of a forward pass, or with `train` of a full training
    step (forward, backward, AdamW step) on random data, for each model name; `compile_with` is
    `compile_model`'s (how, backend, mode), the same for every model. `model_kwargs` reach every model this
    package registers (the softmax ones less the MHLA op's settings); timm's own get none of `MHLA_KWARGS`."""
    rows = []
    for name in names:
        attention = attention_of(name)  # from timm's registry: None for timm's own models
        drop = MHLA_KWARGS if attention is None else set(MHLA_DEFAULTS) if attention == "softmax" else set()
        kwargs = {k: v for k, v in model_kwargs.items() if k not in drop}
        if img_size:
            kwargs["img_size"] = img_size
        model = compile_model(timm.create_model(name, **kwargs).to(device).train(train), *compile_with)
        override = {"input_size": (3, img_size, img_size)} if img_size else {}
        size = resolve_data_config(override, model=model)["input_size"]
        x = torch.randn(batch_size, *size, device=device)
        rate = _images_per_second(model, x, device, steps, train)
        rows.append(dict(model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6, img_per_s=rate,
                         compile=compile_with[0]))
        print(f"{name:36s} {rows[-1]['params_m']:7.2f}M  {rate:10.1f} img/s ({'train' if train else 'inference'}, "
              f"compile {compile_with[0]})", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict | list[dict]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    settings = compile_settings(args)
    if args.throughput:
        return throughput(args.models, args.batch_size, device, args.steps, args.img_size, args.model_kwargs,
                          train=args.train, compile_with=settings)
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (or --throughput)")
    model, cfg = model_from_checkpoint(args.checkpoint)
    model = compile_model(model.to(device), *settings)
    data_cfg = resolve_data_config({"input_size": (3, cfg["img_size"], cfg["img_size"])} if cfg.get("img_size")
                                   else {}, model=model)
    _, eval_tf = build_transforms(data_cfg, argparse.Namespace(**cfg))
    loader = eval_loader(check_split(args.data_dir or cfg.get("data_dir") or "", args.split), eval_tf,
                         batch_size=args.batch_size, rank=0, world=1, workers=args.workers,
                         class_names=cfg.get("class_names"))  # runs before the class names were stored: None
    metrics = evaluate(model, loader, device, amp=_amp(device))
    print(f"{args.checkpoint}: top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  ({metrics['count']} images)")
    return metrics


if __name__ == "__main__":
    main()
