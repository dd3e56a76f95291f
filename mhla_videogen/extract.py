"""Precompute Wan VAE latents and UMT5 text embeddings for `python -m mhla_videogen.train` (resumable).

    python -m mhla_videogen.extract --model WAN_DIFFUSERS_DIR --data DATA_DIR --out LATENT_DIR \\
        [--height 480 --width 800 --frames 81 --frame-stride 1] [--device cuda] [--rank R --world W]

DATA_DIR holds `metadata.jsonl`, one line per clip: {"video": PATH, "caption": TEXT} (PATH relative to DATA_DIR).
A clip is a folder of frame images (sorted by name), a `.npy` array [T, H, W, 3] uint8, or a video file read by
diffusers' `load_video` (needs imageio + imageio-ffmpeg). Frames are taken every `--frame-stride`, the first
`--frames` of them kept (clips that are too short are skipped and listed), resized to cover (height, width) and
centre-cropped, scaled to [-1, 1].

LATENT_DIR gets one `{index:07d}.safetensors` per clip with `latents` [16, 1 + (frames - 1) / 4, H / 8, W / 8]
(the VAE posterior mean, normalised with the VAE's `latents_mean` / `latents_std` as WanPipeline expects) and
`text` [L, 4096] (UMT5 embedding of the caption, trimmed to its tokens; the trainer zero-pads to
`max_sequence_length` as WanPipeline does), plus `empty.safetensors` (the empty prompt, for caption dropout)
and `meta.json`. Files are written atomically and existing ones are skipped, so a killed run resumes; `--rank` /
`--world` (default: torchrun's RANK / WORLD_SIZE) split the clips between processes, one per GPU:
`torchrun --nproc_per_node 8 -m mhla_videogen.extract ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mhla_core.checkpoint import atomic_write


def read_metadata(data_dir: Path) -> list[dict]:
    path = data_dir / "metadata.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist (one JSON line per clip: {{\"video\": PATH, \"caption\": TEXT}})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if "video" not in r or "caption" not in r:
            raise SystemExit(f"{path}: line {i + 1} lacks 'video' or 'caption'")
    return rows


def load_frames(path: Path) -> np.ndarray:
    """[T, H, W, 3] uint8 from a frame folder, a .npy array or a video file."""
    from PIL import Image

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    if path.suffix == ".npy":
        return np.load(path)
    from diffusers.utils import load_video

    return np.stack([np.asarray(im.convert("RGB")) for im in load_video(str(path))])


def prepare_clip(frames: np.ndarray, num_frames: int, stride: int, height: int, width: int) -> torch.Tensor | None:
    """[1, 3, num_frames, height, width] in [-1, 1] (resize to cover, centre crop), or None if too short."""
    import torch.nn.functional as F

    frames = frames[::stride][:num_frames]
    if len(frames) < num_frames:
        return None
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(-1, 1)
    return x.permute(1, 0, 2, 3)[None]


@torch.no_grad()
def encode_video(vae, clip: torch.Tensor) -> torch.Tensor:
    """Normalised latents [C, f, h, w] (posterior mean) as WanPipeline's decoder expects."""
    z = vae.encode(clip.to(vae.device, vae.dtype)).latent_dist.mode()[0].float()
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(-1, 1, 1, 1)
    return ((z - mean) / std).cpu()


@torch.no_grad()
def encode_text(pipe, caption: str, max_sequence_length: int) -> torch.Tensor:
    """UMT5 embedding [L, D] of `caption`, trimmed to its tokens (at least one row)."""
    ids = pipe.tokenizer([caption], padding="max_length", max_length=max_sequence_length, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    n = max(int(ids.attention_mask.sum()), 1)
    emb = pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                             device=pipe.text_encoder.device)[0][0]
    return emb[:n].float().cpu()


def save_sample(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mhla_videogen.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="local Wan2.1 diffusers folder (tokenizer, text_encoder, vae)")
    a("--data", required=True, help="folder with metadata.jsonl")
    a("--out", required=True)
    a("--height", type=int, default=480)
    a("--width", type=int, default=800)
    a("--frames", type=int, default=81)
    a("--frame-stride", type=int, default=1)
    a("--max-sequence-length", type=int, default=512)
    a("--device", default=None)
    a("--text-dtype", default=None, choices=["bfloat16", "float32"],
      help="UMT5 dtype; default bfloat16 on CUDA (as generate runs it), float32 on CPU. The VAE runs in float32")
    a("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="default: $RANK (torchrun)")
    a("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE (torchrun)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from diffusers import AutoencoderKLWan, WanPipeline

    from mhla_videogen.generate import MissingWeights, check_model_dir

    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise SystemExit("--frames must be 4k + 1 and --height / --width multiples of 16")
    data, out = Path(args.data), Path(args.out)
    rows = read_metadata(data)
    try:
        model = check_model_dir(args.model, need_transformer=False)
    except MissingWeights as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", dtype=torch.float32, local_files_only=True)
    text_dtype = getattr(torch, args.text_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    pipe = WanPipeline.from_pretrained(model, vae=vae, transformer=None, dtype=text_dtype,
                                       local_files_only=True).to(device)
    pipe.vae.to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(model), height=args.height, width=args.width, frames=args.frames, text_dtype=str(text_dtype),
                frame_stride=args.frame_stride, max_sequence_length=args.max_sequence_length, clips=len(rows))
    if args.rank == 0:
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        if not (out / "empty.safetensors").is_file():
            save_sample(out / "empty.safetensors", {"text": encode_text(pipe, "", args.max_sequence_length)}, {})
    done = skipped = short = 0
    t0 = time.time()
    mine = list(range(args.rank, len(rows), args.world))
    for n, i in enumerate(mine):
        dst = out / f"{i:07d}.safetensors"
        if dst.is_file():
            skipped += 1
            continue
        clip = prepare_clip(load_frames(data / rows[i]["video"]), args.frames, args.frame_stride, args.height,
                            args.width)
        if clip is None:
            short += 1
            print(f"skip (too short): {rows[i]['video']}", file=sys.stderr)
            continue
        save_sample(dst, {"latents": encode_video(pipe.vae, clip),
                          "text": encode_text(pipe, rows[i]["caption"], args.max_sequence_length)},
                    {"caption": rows[i]["caption"], "video": str(rows[i]["video"])})
        done += 1
        rate = done / (time.time() - t0)
        print(json.dumps(dict(clip=n + 1, of=len(mine), clips_per_s=round(rate, 3),
                              eta_min=round((len(mine) - n - 1) / max(rate, 1e-9) / 60, 1))), flush=True)
    return dict(written=done, skipped_existing=skipped, too_short=short)


if __name__ == "__main__":
    print(json.dumps(main()))
