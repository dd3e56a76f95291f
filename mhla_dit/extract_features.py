"""Encode an ImageFolder into a latent store (`mhla_dit.data`) with a diffusers AutoencoderKL.

    python -m mhla_dit.extract_features --data-path /data/imagenet/train --out latents/in256 \
        --vae stabilityai/sd-vae-ft-ema --image-size 256
    torchrun --nproc_per_node=8 -m mhla_dit.extract_features ...      # shards are split across processes

Images are centre-cropped as in ADM/DiT, scaled to [-1, 1] and encoded together with their horizontal
flip; latents are sampled from the posterior (seeded per shard) and stored as (z - shift) * scale with the
VAE's own `scaling_factor` and `shift_factor` (0.18215 and none for the SD VAEs; `--scale` / `--shift`
override them); both are recorded in meta.json, and the sampler decodes with z / scale + shift.
Finished shards are skipped on a rerun, so an interrupted extraction resumes where it stopped.
`--vae` is a local folder or a hub id (a hub id downloads on first use).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from mhla_dit.data import read_meta, shard_done, write_meta, write_shard

SD_VAE_SCALE = 0.18215


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: box-halve while at least 2x too large, bicubic-resize the short side, crop the centre."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


class _ToTensor:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(center_crop_arr(image.convert("RGB"), self.size), dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-path", required=True, help="ImageFolder root (class sub-folders)")
    a("--out", required=True, help="latent store folder")
    a("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL folder or hub id")
    a("--image-size", type=int, default=256)
    a("--scale", type=float, default=None, help="latent multiplier (default: the VAE's scaling_factor)")
    a("--shift", type=float, default=None, help="subtracted before scaling (default: the VAE's shift_factor, else 0)")
    a("--no-flip", action="store_true", help="store only the image, not its horizontal flip")
    a("--mode", choices=["sample", "mean"], default="sample", help="posterior sample (DiT) or mean")
    a("--shard-size", type=int, default=10000, help="images per shard")
    a("--batch-size", type=int, default=64)
    a("--dtype", choices=["float32", "float16"], default="float32", help="stored latent dtype")
    a("--workers", type=int, default=8)
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _check_meta(out: Path, meta: dict) -> None:
    if (out / "meta.json").is_file():
        old = read_meta(out)
        keys = ("num_images", "shard_size", "image_size", "vae", "scale", "shift", "views", "mode", "seed", "dtype")
        old.setdefault("shift", 0.0)  # stores written before the shift was recorded had none
        diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k) != meta[k]}
        if diff:
            raise ValueError(f"{out} holds a store made with other settings {diff}; use another --out")


def latent_scaling(vae, scale: float | None = None, shift: float | None = None) -> tuple[float, float]:
    """(scale, shift) of the latents: the given values, else the VAE config's `scaling_factor` (0.18215 when it
    has none) and `shift_factor` (0 when it has none); latents are (z - shift) * scale."""
    cfg = getattr(vae, "config", {})
    scale = scale if scale is not None else getattr(cfg, "scaling_factor", None) or SD_VAE_SCALE
    shift = shift if shift is not None else getattr(cfg, "shift_factor", None) or 0.0
    return float(scale), float(shift)


def _vae_id(vae: str) -> str:
    """A local VAE folder as an absolute path (so samplers find it from anywhere), a hub id as given."""
    return str(Path(vae).resolve()) if Path(vae).exists() else vae


@torch.no_grad()
def run(args: argparse.Namespace) -> Path:
    """Extract every unfinished shard this process owns; returns the store folder."""
    from diffusers import AutoencoderKL
    from torchvision.datasets import ImageFolder
    from tqdm import tqdm

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    dataset = ImageFolder(args.data_path, transform=_ToTensor(args.image_size))
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling {factor}")
    scale, shift = latent_scaling(vae, args.scale, args.shift)
    views = 1 if args.no_flip else 2
    num_shards = math.ceil(len(dataset) / args.shard_size)
    meta = dict(num_images=len(dataset), num_shards=num_shards, shard_size=args.shard_size, image_size=args.image_size,
                shape=[vae.config.latent_channels, args.image_size // factor, args.image_size // factor], views=views,
                scale=scale, shift=shift, vae=_vae_id(args.vae), mode=args.mode, seed=args.seed, dtype=args.dtype,
                num_classes=len(dataset.classes), classes=dataset.classes)
    _check_meta(out, meta)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_meta(out, meta)
    mine = [s for s in range(rank, num_shards, world) if not shard_done(out, s)]
    todo = sum(min(args.shard_size, len(dataset) - s * args.shard_size) for s in mine)
    bar = tqdm(total=todo, desc=f"latents (rank {rank})", unit="img", disable=rank != 0 and world > 1)
    for s in mine:
        idx = range(s * args.shard_size, min((s + 1) * args.shard_size, len(dataset)))
        loader = DataLoader(Subset(dataset, idx), batch_size=args.batch_size, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + s)
        xs, ys = [], []
        for images, labels in loader:
            images = images.to(device)
            batch = torch.cat([images, images.flip(-1)]) if views == 2 else images
            dist = vae.encode(batch).latent_dist
            z = ((dist.sample(generator=gen) if args.mode == "sample" else dist.mode()) - shift) * scale
            z = torch.stack(z.chunk(views), dim=1)  # [n, views, C, h, w]
            xs.append(z.to("cpu", getattr(torch, args.dtype)).numpy())
            ys.append(labels.numpy())
            bar.update(len(labels))
        write_shard(out, s, np.concatenate(xs), np.concatenate(ys))
    bar.close()
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
