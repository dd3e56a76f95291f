"""DiT latency of Wan2.1-T2V-1.3B: softmax (best SDPA backend) vs MHLA hybrid 2/3 vs MHLA full.

    python scripts/bench_video.py --markdown docs/benchmarks_wan.md     # one H200: about 2-3 minutes
    python scripts/bench_video.py --extra-shapes 81x480x832 161x480x800 --markdown ...
                                     # + 480x832 (padded block layout) and a 161-frame clip: about 5-6 minutes
    python scripts/bench_video.py --tiny --cpu                           # CPU smoke run (the test)

Random weights in bf16 (the 1.3B config: dim 1536, 12 heads x 128, FFN 8960, 30 layers), batch 1, a 512-token
text embedding, no grad. 480x800x81 -> latents 21x60x100 -> 21x30x50 = 31,500 tokens. One denoising step
with classifier-free guidance = 2 transformer forwards (the cond and uncond passes); a 50-step video = 100
forwards (the VAE decode and the text encoder are not included). Softmax runs under each SDPA backend
(flash, cuDNN, memory-efficient) and the fastest is reported; MHLA runs its default backend (Triton on
CUDA). Times are medians of `--reps` forwards after `--warmup` forwards (CUDA events).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mhla_core.compile import add_compile_args, compile_model, compile_settings  # noqa: E402
from scripts.bench_timing import time_ms  # noqa: E402

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=32, ffn_dim=96, num_layers=3, rope_max_seq_len=64)


def _sdpa_backends(cuda: bool) -> list[tuple[str, object]]:
    if not cuda:
        return [("default", None)]
    from torch.nn.attention import SDPBackend

    return [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def _under(backend):
    if backend is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def build(kind: str, cfg: dict, device: torch.device, dtype: torch.dtype, block_layout):
    from diffusers import WanTransformer3DModel

    from mhla_videogen.model import MHLAWanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        if kind == "softmax":
            model = WanTransformer3DModel(**cfg)
        else:
            model = MHLAWanTransformer3DModel(**cfg, mhla_layers=kind, block_layout=block_layout)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])  # as from_pretrained(torch_dtype=...) does
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not keep.intersection(name.split(".")) and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model.eval()


def parse_shape(text: str) -> tuple[int, int, int]:
    """"81x480x800" -> (frames, height, width)."""
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be FRAMESxHEIGHTxWIDTH, got {text!r}") from None
    if (f - 1) % 4 or h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"{text}: frames must be 4k + 1, height and width multiples of 16")
    return f, h, w


def run(args) -> tuple[list[dict], dict]:
    cuda = not args.cpu and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = TINY if args.tiny else WAN_1_3B
    shapes = [(args.frames, args.height, args.width), *args.extra_shapes]
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500.0], device=device)
    text = torch.randn(1, args.text_len, cfg["text_dim"], generator=g).to(device, dtype)
    rows = []
    for kind in args.models:
        model = compile_model(build(kind, cfg, device, dtype, tuple(args.block_layout)), *compile_settings(args))
        n_mhla = len(getattr(model.config, "mhla_layers", []) or [])
        for prec in ["reference"] if kind == "softmax" else args.mhla_precision:
            if kind != "softmax":
                model.set_mhla_precision(prec)
            label = kind if prec == "reference" else f"{kind}-{prec}"
            for shape in shapes:
                lat = (1 + (shape[0] - 1) // 4, shape[1] // 8, shape[2] // 8)
                x = torch.randn(1, cfg["in_channels"], *lat, generator=g).to(device, dtype)

                def fwd(model=model, x=x):
                    with torch.no_grad():
                        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

                results = {}
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                for name, backend in (_sdpa_backends(cuda) if kind == "softmax" else [("mhla", None)]):
                    try:
                        with _under(backend):
                            results[name] = time_ms(fwd, device, args.warmup, args.reps)
                    except RuntimeError as e:  # a backend that does not support this shape / card, or out of memory
                        print(f"{kind}/{name}/{shape}: skipped ({str(e).splitlines()[0][:100]})", file=sys.stderr)
                    if cuda:
                        torch.cuda.empty_cache()
                if not results:
                    print(f"{kind} {shape}: no backend ran", file=sys.stderr)
                    continue
                best = min(results, key=results.get)
                ms = results[best]
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                rows.append(dict(model=label, peak_gib=peak, shape=shape, tokens=lat[0] * (lat[1] // 2) * (lat[2] // 2),
                                 mhla_layers=n_mhla, backend=best, all_backends=results, forward_ms=ms,
                                 step_s=2 * ms / 1e3, video_s=2 * args.steps * ms / 1e3))
                print(f"{label:12s} {'x'.join(map(str, shape)):12s} {best:9s} {ms:10.1f} ms/forward "
                      f"{2 * args.steps * ms / 1e3:8.1f} s/{args.steps}-step video"
                      f"  (all: { {k: round(v, 1) for k, v in results.items()} })", flush=True)
                del fwd, x
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for r in rows:
        base = next((b["forward_ms"] for b in rows if b["model"] == "softmax" and b["shape"] == r["shape"]), None)
        r["speedup"] = base / r["forward_ms"] if base else None
    return rows, dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                      dtype=str(dtype).replace("torch.", ""), config="tiny" if args.tiny else "Wan2.1-T2V-1.3B")


def markdown(rows: list[dict], info: dict, args) -> str:
    import diffusers

    lines = [
        f"## Wan DiT latency ({info['config']}, softmax vs MHLA)",
        "",
        f"{info['device']}, {info['dtype']}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Random weights, batch 1, "
        f"{args.text_len} text tokens, block layout {tuple(args.block_layout)} (padded where it does not divide); "
        f"median of {args.reps} forwards after {args.warmup}. A step = 2 forwards (cfg); "
        f"a video = {args.steps} steps, DiT only (no VAE decode, no text encoder). "
        f"`python scripts/bench_video.py {' '.join(args.argv)}`".rstrip() + ".",
        "",
        "| video (FxHxW) | tokens | model | MHLA layers | attention | ms / forward | s / step (cfg) | s / video "
        "| speed-up | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["shape"])):
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['tokens']:,} | {r['model']} | {r['mhla_layers']} | "
                     f"{r['backend']} | {r['forward_ms']:.1f} | {r['step_s']:.2f} | {r['video_s']:.1f} | {sp} "
                     f"| {peak} |")
    lines += ["", "Paper (their setup, FlashAttention baseline): softmax 139 s, MHLA hybrid 84 s (1.65x), "
              "full 62 s (2.24x) per 480x800x81 video. Issue 7 targets here: full >= 2.5x, hybrid >= 1.7x.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", nargs="+", default=["softmax", "hybrid", "full"], choices=["softmax", "hybrid", "full"])
    a("--height", type=int, default=480)
    a("--width", type=int, default=800)
    a("--frames", type=int, default=81)
    a("--extra-shapes", type=parse_shape, nargs="*", default=[], metavar="FxHxW",
      help="more videos with the same models, e.g. 81x480x832 161x480x800")
    a("--mhla-precision", nargs="+", default=["reference"], choices=["reference", "fast"],
      help="MHLA processor numerics to time (fast: fp32 RoPE, bf16 operands into the kernel); rows 'full-fast' etc.")
    a("--block-layout", type=int, nargs=3, default=[3, 5, 10])
    a("--text-len", type=int, default=512)
    a("--steps", type=int, default=50)
    a("--warmup", type=int, default=2)
    a("--reps", type=int, default=5)
    a("--markdown", default=None, help="append the table to this file")
    a("--tiny", action="store_true", help="tiny config, small grid (implies a 5x64x96 clip unless given)")
    a("--cpu", action="store_true")
    add_compile_args(p)  # every model compiled the same way ("blocks": diffusers' compile_repeated_blocks)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.tiny:
        given = " ".join(argv)
        args.height = args.height if "--height" in given else 64
        args.width = args.width if "--width" in given else 96
        args.frames = args.frames if "--frames" in given else 5
        args.block_layout = args.block_layout if "--block-layout" in given else [2, 2, 3]
        args.text_len = args.text_len if "--text-len" in given else 8
        args.warmup, args.reps = (args.warmup, args.reps) if "--reps" in given else (1, 1)
    rows, info = run(args)
    text = markdown(rows, info, args)
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
