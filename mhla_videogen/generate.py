"""Text-to-video with an MHLA Wan transformer through diffusers' `WanPipeline`.

    python -m mhla_videogen.generate --model WAN_DIFFUSERS_DIR --transformer MHLA_DIR \\
        --prompt "a cat surfing a wave" [--prompts-file FILE] --out-dir videos/ \\
        [--height 480 --width 800 --frames 81 --steps 50 --cfg 3.0 --flow-shift 3.0 --seed 0] \\
        [--scheduler unipc|dpm|euler] [--offload] [--skip-existing]
    torchrun --nproc_per_node 8 -m mhla_videogen.generate ...   # prompts split over GPUs (i % world == rank)

`--model` is a local copy of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (tokenizer, text_encoder, vae, scheduler,
optionally transformer); `--transformer` is an MHLA model folder (`python -m mhla_videogen.convert` or a training
export). Without `--transformer` the softmax transformer of `--model` is used (the baseline). Nothing is
downloaded: a missing folder or file is an error that says what to fetch.

Output: `{out_dir}/{index:04d}_{slug}.mp4` when diffusers' `export_to_video` has a backend (imageio +
imageio-ffmpeg, or opencv); otherwise a folder of PNG frames per prompt (and a warning saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from mhla_core.compile import add_compile_args, compile_model, compile_settings

DEFAULT_NEGATIVE = ""  # Wan's long Chinese negative prompt is not the paper's setting; pass one with --negative-prompt
PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler")
DOWNLOAD_HINT = ("fetch it first, e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
                 "--local-dir {path}` (this command never downloads)")


class MissingWeights(FileNotFoundError):
    """A local model folder or one of its parts is absent."""


def check_model_dir(path: str | Path, need_transformer: bool) -> Path:
    """The Wan diffusers folder `path`, after checking that every needed part is on disk."""
    path = Path(path)
    if not path.is_dir():
        raise MissingWeights(f"model folder {path} does not exist; " + DOWNLOAD_HINT.format(path=path))
    if not (path / "model_index.json").is_file():
        raise MissingWeights(f"{path} has no model_index.json (not a diffusers pipeline folder); "
                             + DOWNLOAD_HINT.format(path=path))
    parts = PIPELINE_PARTS + (("transformer",) if need_transformer else ())
    missing = [p for p in parts if not (path / p).is_dir()]
    for p in ("text_encoder", "vae") + (("transformer",) if need_transformer else ()):
        if p not in missing and not _has_weights(path / p):
            missing.append(f"{p} (no weight files)")
    if missing:
        raise MissingWeights(f"{path} lacks {', '.join(missing)}; " + DOWNLOAD_HINT.format(path=path))
    return path


def check_transformer_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() or not _has_weights(path):
        raise MissingWeights(f"MHLA transformer folder {path} is missing config.json or weights; build one with "
                             "`python -m mhla_videogen.convert --src RELEASED.safetensors --dst DIR` or from training")
    return path


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json"))


def make_scheduler(kind: str, base_config: dict, flow_shift: float):
    """UniPC / DPM-Solver++ with flow sigmas (Wan's setting) or flow-matching Euler, shifted by `flow_shift`."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler.from_config(base_config, prediction_type="flow_prediction",
                                                   use_flow_sigmas=True, flow_shift=flow_shift)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(base_config, prediction_type="flow_prediction",
                                                       use_flow_sigmas=True, flow_shift=flow_shift)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config, shift=flow_shift)
    raise ValueError(f"scheduler must be unipc, dpm or euler, got {kind!r}")


def build_pipeline(model_dir, transformer_dir=None, scheduler="unipc", flow_shift=3.0, dtype=torch.bfloat16,
                   mhla_precision: str = "reference"):
    """`WanPipeline` from local folders, with the MHLA transformer (if given) in `dtype`, VAE in float32.

    `mhla_precision`: the MHLA processors' numerics, "reference" or "fast" (`MHLAWanAttnProcessor`)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from mhla_videogen.model import MHLAWanTransformer3DModel

    model_dir = check_model_dir(model_dir, need_transformer=transformer_dir is None)
    kwargs = {}
    if transformer_dir is not None:
        kwargs["transformer"] = MHLAWanTransformer3DModel.from_pretrained(
            check_transformer_dir(transformer_dir), dtype=dtype, local_files_only=True)
        kwargs["transformer"].set_mhla_precision(mhla_precision)
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32,
                                           local_files_only=True)
    pipe = WanPipeline.from_pretrained(model_dir, vae=vae, dtype=dtype, local_files_only=True, **kwargs)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, flow_shift)
    return pipe


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"prompts file {path} does not exist")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not out:
        raise SystemExit("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE (one per line)")
    return out


def slug(text: str, n: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


def video_backend() -> str | None:
    """'imageio' or 'opencv' when diffusers' `export_to_video` can write an mp4 here, else None."""
    from diffusers.utils.import_utils import is_imageio_available, is_opencv_available

    if is_imageio_available():
        try:
            import imageio

            imageio.plugins.ffmpeg.get_exe()
            return "imageio"
        except Exception:  # imageio without imageio-ffmpeg
            pass
    if is_opencv_available():
        return "opencv"
    return None


def save_video(frames, path_stem: Path, fps: int) -> Path:
    """Write `frames` (list of HxWx3 float arrays in [0, 1]) as `path_stem.mp4`, or PNGs in `path_stem/`."""
    if video_backend() is not None:
        from diffusers.utils import export_to_video

        out = path_stem.with_suffix(".mp4")
        export_to_video(list(frames), str(out), fps=fps)
        return out
    import numpy as np
    from PIL import Image

    path_stem.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray((np.clip(np.asarray(f), 0, 1) * 255).round().astype("uint8")).save(path_stem / f"{i:04d}.png")
    return path_stem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mhla_videogen.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="local Wan2.1 diffusers folder (tokenizer, text_encoder, vae, scheduler)")
    a("--transformer", default=None, help="MHLA transformer folder (default: the softmax one in --model)")
    a("--prompt", action="append", default=None, help="a prompt (repeatable)")
    a("--prompts-file", default=None, help="text file, one prompt per line (# comments)")
    a("--negative-prompt", default=DEFAULT_NEGATIVE)
    a("--out-dir", default="videos")
    a("--height", type=int, default=480)
    a("--width", type=int, default=800)
    a("--frames", type=int, default=81, help="4k + 1")
    a("--steps", type=int, default=50)
    a("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 disables the negative pass)")
    a("--flow-shift", type=float, default=3.0)
    a("--scheduler", default="unipc", choices=["unipc", "dpm", "euler"])
    a("--seed", type=int, default=0, help="prompt i uses seed + i")
    a("--fps", type=int, default=16)
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--offload", action="store_true", help="model CPU offload (enable_model_cpu_offload) for small GPUs")
    a("--mhla-precision", default="reference", choices=["reference", "fast"],
      help="MHLA numerics: reference (float64 RoPE, fp32 operator inputs, as the authors) or fast (fp32 RoPE, "
           "model-dtype operator inputs with fp32 state accumulation)")
    a("--max-sequence-length", type=int, default=512)
    a("--skip-existing", action="store_true", help="skip prompts whose output already exists (resume a prompt set)")
    a("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process takes prompts i %% world == rank")
    a("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE (torchrun)")
    add_compile_args(p)  # "blocks": diffusers' compile_repeated_blocks on the transformer
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args.prompt, args.prompts_file)
    if (args.frames - 1) % 4:
        raise SystemExit(f"--frames must be 4k + 1 (Wan's VAE), got {args.frames}")
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    try:
        pipe = build_pipeline(args.model, args.transformer, args.scheduler, args.flow_shift, getattr(torch, args.dtype),
                              mhla_precision=args.mhla_precision)
    except MissingWeights as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    blocks = getattr(pipe.transformer.config, "block_layout", None)
    grid = (1 + (args.frames - 1) // 4, args.height // 16, args.width // 16)
    if blocks is not None and any(b > g for b, g in zip(blocks, grid)):
        raise SystemExit(f"{args.frames}x{args.height}x{args.width} gives a token grid {grid} smaller than the MHLA "
                         f"block layout {tuple(blocks)}: use a larger video")
    if args.offload:
        if device.type != "cuda":
            raise SystemExit("--offload moves models between the CPU and a GPU: it needs CUDA")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    compile_model(pipe.transformer, *compile_settings(args))
    if video_backend() is None:
        print("warning: no video writer (install imageio + imageio-ffmpeg, the `video` extra); saving PNG frames",
              file=sys.stderr)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    log_name = "generations.jsonl" if args.world == 1 else f"generations_rank{args.rank}.jsonl"
    for i, prompt in enumerate(prompts):
        if i % args.world != args.rank:
            continue
        stem = out_dir / f"{i:04d}_{slug(prompt)}"
        if args.skip_existing and (stem.with_suffix(".mp4").is_file() or (stem / "0000.png").is_file()):
            continue
        t0 = time.time()
        gen = torch.Generator(device="cpu").manual_seed(args.seed + i)
        result = pipe(prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.cfg,
                      generator=gen, max_sequence_length=args.max_sequence_length, output_type="np")
        path = save_video(result.frames[0], stem, args.fps)
        secs = time.time() - t0
        meta = dict(index=i, prompt=prompt, seed=args.seed + i, path=str(path), seconds=round(secs, 2),
                    steps=args.steps, cfg=args.cfg, flow_shift=args.flow_shift, scheduler=args.scheduler,
                    size=[args.frames, args.height, args.width], transformer=args.transformer or "softmax")
        with open(out_dir / log_name, "a") as f:
            f.write(json.dumps(meta) + "\n")
        print(f"[{i + 1}/{len(prompts)}] {path} ({secs:.1f} s)", flush=True)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
