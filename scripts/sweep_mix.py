"""The block-mixing GEMM alone (Y = W X over the block states), against its bandwidth roofline (CUDA).

    python scripts/sweep_mix.py [--markdown out.md]          # H200: about 1 minute
    TRITON_INTERPRET=1 python scripts/sweep_mix.py --tiny     # CPU smoke run: correctness of every variant

The non-causal kernels keep one fp32 state row per block, X [B*H, M, RS] (RS >= Dk*Dv + Dk), and mix
it three times per forward+backward (docs/kernels.md: 41 % of the Wan fwd+bwd, 63 % at 126K tokens). This
times, on the same X and W:
  * `_mix_triton` with the default `StateConfig.mix_kernel` and with variants of its tiles, warps and
    stages, each a `StateConfig` of its own (`block_i` below M forces row tiles written out of place);
  * cuBLAS: one broadcast batched GEMM in tf32, and in bf16 on states already held in bf16 (what a
    bf16 state store would cost; casts not timed).
Each variant is first checked against a float64 product (relative error), then timed with
triton.testing.do_bench (median). GB/s counts reading X and writing Y once in the storage dtype;
"x roofline" is the time over the HBM time at --hbm-tbps.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import replace
from functools import partial

import torch

from mhla_core.ops.noncausal import chunk as TK
from mhla_core.ops.noncausal import mix as MX
from mhla_core.ops.noncausal.state_config import StateConfig, default_state_config

SHAPES = {"Wan": (1, 12, 31500, 128, 150), "126K": (1, 12, 126000, 128, 600)}
TINY_SHAPES = {"tiny": (1, 2, 40 * 3, 16, 40)}  # M = 40 > block_i = 32: row tiles out of place
# changes to the default `MixLaunch` (StateConfig.mix_kernel)
VARIANTS: dict[str, dict] = {
    "default": {},
    "I64 (row tiles, out of place)": {"block_i": 32, "block_i_large": 64},
    "I128 (row tiles, out of place)": {"block_i": 64, "block_i_large": 128},
    "I64 C128": {"block_i": 32, "block_i_large": 64, "block_c": 128},
    "I64 J64 C128": {"block_i": 32, "block_i_large": 64, "block_j": 64, "block_c": 128},
    "I128 J64 C64 w4": {"block_i": 64, "block_i_large": 128, "block_j": 64, "num_warps": 4},
    "default C32 w4": {"block_c": 32, "num_warps": 4},
    "default J16 s4": {"block_j": 16, "num_stages": 4},
}


def _variant(base: StateConfig, tiles: dict) -> StateConfig:
    return replace(base, mix_kernel=replace(base.mix_kernel, **tiles))


def _plan(shape, device, dtype, cfg: StateConfig):
    B, H, N, D, M = shape
    q = torch.empty(B, N, H, D, device=device, dtype=dtype)
    return TK.make_plan(q, q, N // M, M, TK.NORM_EXACT, cfg)


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")
    return lambda fn: float("nan")


def run(shapes: dict, device: torch.device, hbm_tbps: float, tiny: bool) -> list[dict]:
    """One row per (shape, variant): ms, GB/s, x roofline, relative error."""
    time_ms = _timer(device)
    rows = []
    base = default_state_config()
    for sname, shape in shapes.items():
        p = _plan(shape, device, torch.bfloat16, base)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.rand(p.B * p.H, p.M, p.row_stride, generator=g).to(device)
        w = torch.rand(p.M, p.M, generator=g).to(device)
        w3, sw_h = MX._mixing3(w)
        ref = torch.matmul(w.double(), x[..., : p.row].double())
        bytes_fp32 = 2 * x[..., : p.row].numel() * 4
        variants = dict(list(VARIANTS.items())[:3]) if tiny else VARIANTS
        for vname, tiles in variants.items():
            try:
                pv = _plan(shape, device, torch.bfloat16, _variant(base, tiles))
                y = MX._mix_triton(pv, w3, sw_h, x.clone(), False, True)
                err = ((y[..., : p.row].double() - ref).norm() / ref.norm()).item()
                xs = x.clone()
                ms = time_ms(partial(MX._mix_triton, pv, w3, sw_h, xs, False, True))
            except Exception as e:  # a variant that does not compile or fit
                print(f"{sname} {vname}: failed ({str(e).splitlines()[0][:120]})", flush=True)
                continue
            rows.append(_row(sname, f"triton {vname}", ms, bytes_fp32, hbm_tbps, err))
        if device.type == "cuda":
            xv = x.view(p.B, p.H, p.M, p.row_stride)
            torch.backends.cuda.matmul.allow_tf32 = True
            y = torch.matmul(w, xv)
            err = ((y.view_as(x)[..., : p.row].double() - ref).norm() / ref.norm()).item()
            rows.append(_row(sname, "cuBLAS tf32 (fp32 states)", time_ms(partial(torch.matmul, w, xv)),
                             bytes_fp32, hbm_tbps, err))
            xb, wb = xv.to(torch.bfloat16), w.to(torch.bfloat16)
            y = torch.matmul(wb, xb)
            err = ((y.view_as(x)[..., : p.row].double() - ref).norm() / ref.norm()).item()
            rows.append(_row(sname, "cuBLAS bf16 (bf16 states)", time_ms(partial(torch.matmul, wb, xb)),
                             bytes_fp32 // 2, hbm_tbps, err))
        for r in rows:
            if r["shape"] == sname:
                print(_line(r), flush=True)
    return rows


def _row(shape, name, ms, nbytes, hbm_tbps, err) -> dict:
    roof_ms = nbytes / (hbm_tbps * 1e12) * 1e3
    return dict(shape=shape, variant=name, ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan"),
                x_roof=ms / roof_ms if ms == ms else float("nan"), err=err)


def _line(r: dict) -> str:
    return (f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['x_roof']:.1f} "
            f"| {r['err']:.1e} |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape, three variants, no timing (interpreter)")
    ap.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth for the roofline (H200: 4.8)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(TINY_SHAPES if args.tiny else SHAPES, device, args.hbm_tbps, args.tiny)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    text = "\n".join([
        f"### Block mixing alone ({card}, {datetime.date.today()}, `python scripts/sweep_mix.py`)", "",
        "| shape | variant | ms | GB/s | x roofline | rel. err |", "|---|---|---|---|---|---|",
        *(_line(r) for r in rows), ""])
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    return rows


if __name__ == "__main__":
    main()
