"""Sample class-conditional images from a trained DiT: a grid PNG, or N images into an ADM-evaluator .npz.

    python -m mhla_dit.sample --ckpt runs/x/last_ema.safetensors --out sample.png        # cfg 4.0, 8 classes
    torchrun --nproc_per_node=8 -m mhla_dit.sample --ckpt ... --num-samples 50000 --npz samples.npz --cfg-scale 1.5

The model is rebuilt from the checkpoint's metadata (or loaded from a `save_pretrained` / DiTPipeline
folder); `--vae` (default: the VAE named by the training store) decodes z / scale + shift, with the
store's scale and shift (default: the VAE's `scaling_factor` / `shift_factor`); `--vae none` treats the
model's output as pixels in [-1, 1] (1-channel outputs become grey RGB). `--scheduler` picks the sampler
(DDPM, DiT's default, or DDIM / DPM-Solver / Euler on the same training schedule). The .npz holds uint8
NHWC images under "arr_0", as the ADM evaluator reads them. In npz mode every process writes finished
batches to `<npz>.parts/` (so an interrupted run resumes), then rank 0 assembles the first N images in order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from mhla_core.checkpoint import atomic_write
from mhla_core.compile import add_compile_args, compile_model, compile_settings
from mhla_core.training.args import nonnegative_int, positive_int
from mhla_dit.checkpoints import load_model
from mhla_dit.data import save_npy
from mhla_dit.diffusion import SCHEDULERS, make_scheduler, sample

DEFAULT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a training checkpoint (.safetensors with model metadata)")
    a("--vae", default=None, help="AutoencoderKL folder or hub id; 'none' for pixel models (default: the store's)")
    a("--scale", type=float, default=None, help="latent scale (default: the store's, else the VAE's scaling_factor)")
    a("--shift", type=float, default=None, help="latent shift (default: the store's, else the VAE's shift_factor)")
    a("--scheduler", default="ddpm", choices=SCHEDULERS, help="sampler (ddpm: DiT's, with the learned variance)")
    a("--cfg-scale", type=float, default=None, help="guidance (default 4.0 for a grid, 1.5 for --npz)")
    a("--num-sampling-steps", type=positive_int, default=250)
    a("--seed", type=int, default=0)
    a("--class-labels", type=int, nargs="*", default=None, help="grid classes (default: DiT's 8 classes)")
    a("--out", default="sample.png", help="grid PNG path")
    a("--nrow", type=positive_int, default=4, help="grid images per row")
    a("--num-samples", type=nonnegative_int, default=0, help="npz mode: number of images")
    a("--npz", default=None, help="npz mode: output path")
    a("--per-proc-batch-size", type=positive_int, default=32)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp-dtype", default="none", choices=["none", "bfloat16", "float16"],
      help="autocast dtype on CUDA for the model ('bfloat16' is faster)")
    a("--progress", action="store_true", help="a progress bar over the denoising steps")
    add_compile_args(p)
    return p


class Decoder:
    """Latents -> uint8 NHWC images through a diffusers AutoencoderKL (decoding z / scale + shift; None: the
    VAE config's `scaling_factor` / `shift_factor`), or pixels in [-1, 1] without one (`vae` None or "none")."""

    def __init__(self, vae: str | None, scale: float | None, device: torch.device, shift: float | None = None) -> None:
        self.vae, self.scale, self.shift = None, scale, shift
        if vae and vae.lower() != "none":
            from diffusers import AutoencoderKL

            from mhla_dit.extract_features import latent_scaling

            self.vae = AutoencoderKL.from_pretrained(vae).to(device).eval()
            self.scale, self.shift = latent_scaling(self.vae, scale, shift)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(z / self.scale + self.shift).sample if self.vae is not None else z
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 4, pad: int = 2) -> None:
    """Tile uint8 NHWC images into one PNG (rows of `nrow`, `pad` pixels of white between)."""
    n, h, w, c = images.shape
    rows, cols = math.ceil(n / nrow), min(n, nrow)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def _setup(args: argparse.Namespace):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if "LOCAL_RANK" in os.environ:  # launched by torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # only barriers: gloo, with a timeout that outlasts uneven (resumed) sampling
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # DiT's sampling default
    model, meta = load_model(args.ckpt, device)
    compile_model(model, *compile_settings(args))
    data = meta.get("data", {})
    vae, scale, shift = latent_settings(data, args.vae, args.scale, args.shift)
    amp = getattr(torch, args.amp_dtype) if device.type == "cuda" and args.amp_dtype != "none" else None
    return rank, world, device, model, Decoder(vae, scale, device, shift), amp


def latent_settings(data: dict, vae: str | None = None, scale: float | None = None,
                    shift: float | None = None) -> tuple[str | None, float | None, float | None]:
    """(vae, scale, shift) for decoding: the given values, else the training store's (`data`, from the
    checkpoint's metadata); None leaves scale / shift to the VAE's config. A store that records a scale but
    no shift predates the shift and was made without one (0)."""
    vae = vae if vae is not None else data.get("vae")
    scale = scale if scale is not None else data.get("scale")
    shift = shift if shift is not None else data.get("shift", 0.0 if "scale" in data else None)
    return vae, scale, shift


def _latent_shape(model) -> tuple[int, int, int]:
    return (model.in_channels, model.grid[0] * model.patch_size, model.grid[1] * model.patch_size)


def sample_grid(args: argparse.Namespace) -> Path:
    """Sample one image per class label and write them as a grid PNG."""
    _, _, device, model, decode, amp = _setup(args)
    labels = args.class_labels or [c % model.num_classes for c in DEFAULT_LABELS]
    bad = [c for c in labels if not 0 <= c < model.num_classes]
    if bad:
        raise SystemExit(f"--class-labels {bad} are outside the model's classes 0 .. {model.num_classes - 1}")
    cfg = 4.0 if args.cfg_scale is None else args.cfg_scale
    gen = torch.Generator(device).manual_seed(args.seed)
    y = torch.tensor(labels, device=device)
    z = sample(model, y, _latent_shape(model), num_steps=args.num_sampling_steps, cfg_scale=cfg, generator=gen,
               scheduler=make_scheduler(args.scheduler), autocast_dtype=amp, progress=args.progress)
    save_grid(decode(z), args.out, nrow=args.nrow)
    print(f"wrote {args.out} ({len(labels)} images, cfg {cfg}, {args.num_sampling_steps} steps)", flush=True)
    return Path(args.out)


def sample_npz(args: argparse.Namespace) -> Path | None:
    """Sample `--num-samples` images with uniformly random labels across processes into `--npz`."""
    from tqdm import tqdm

    rank, world, device, model, decode, amp = _setup(args)
    cfg = 1.5 if args.cfg_scale is None else args.cfg_scale
    n, parts = args.per_proc_batch_size, Path(str(args.npz) + ".parts")
    rounds = math.ceil(args.num_samples / (n * world))
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        _check_settings(parts / "settings.json", dict(ckpt=str(Path(args.ckpt).resolve()), cfg=cfg, n=n, world=world,
                                                      steps=args.num_sampling_steps, seed=args.seed,
                                                      **_scheduler_setting(args)))
        print(f"{args.num_samples} images: {rounds} rounds of {n} x {world} processes, cfg {cfg}, "
              f"{args.num_sampling_steps} steps", flush=True)
    if dist.is_initialized():
        dist.barrier()
    for r in tqdm(range(rounds), desc="batches", disable=rank != 0):
        path = parts / f"r{r:05d}_p{rank:03d}.npy"
        if path.is_file():
            continue
        gen = torch.Generator(device).manual_seed((args.seed * 100_003 + r) * 1009 + rank)
        y = torch.randint(0, model.num_classes, (n,), device=device, generator=gen)
        z = sample(model, y, _latent_shape(model), num_steps=args.num_sampling_steps, cfg_scale=cfg,
                   generator=gen, scheduler=make_scheduler(args.scheduler), autocast_dtype=amp)
        images = decode(z)
        atomic_write(path, lambda tmp, images=images: save_npy(tmp, images))
    if dist.is_initialized():
        dist.barrier()
    result = None
    if rank == 0:  # image index = round * n * world + i * world + rank, as DiT's sample_ddp
        batches = [[np.load(parts / f"r{r:05d}_p{p:03d}.npy") for p in range(world)] for r in range(rounds)]
        images = np.concatenate([np.stack(b, axis=1).reshape(-1, *b[0].shape[1:]) for b in batches])
        images = images[: args.num_samples]
        atomic_write(args.npz, lambda tmp: _savez(tmp, images))
        shutil.rmtree(parts)
        print(f"wrote {args.npz} [shape={images.shape}]", flush=True)
        result = Path(args.npz)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _check_settings(path: Path, settings: dict) -> None:
    """Parts of an interrupted run are reused only for the same checkpoint and sampling settings."""
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{path.parent} holds parts sampled with other settings {path.read_text().strip()}; "
                         "remove it or choose another --npz")
    path.write_text(json.dumps(settings) + "\n")


def _scheduler_setting(args: argparse.Namespace) -> dict[str, str]:
    """The scheduler among the resume settings; DDPM (the only one before) adds nothing, so older parts resume."""
    return {} if args.scheduler == "ddpm" else {"scheduler": args.scheduler}


def _savez(path: str, images: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, arr_0=images)


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = build_parser().parse_args(argv)
    if bool(args.npz) != bool(args.num_samples):
        raise SystemExit("npz mode needs both --num-samples N and --npz PATH")
    return sample_npz(args) if args.npz else sample_grid(args)


if __name__ == "__main__":
    main()
