"""Where the non-causal MHLA kernels spend their time, and a small launch-parameter sweep (CUDA).

    python scripts/sweep_kernels.py [--markdown out.md]

1. Per-kernel CUDA time (torch.profiler) of one forward+backward at the Wan and 126K shapes.
2. For a few variants of the state path's settings (`StateConfig`: launch tiles, `mix_prec_half`), each
   passed as `NoncausalConfig(state=...)`: forward and forward+backward medians (triton.testing.do_bench)
   and the forward's relative error against the fp32 reference.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from mhla_core import NoncausalConfig, StateConfig, mhla
from mhla_core.ops.noncausal import launch as LAUNCH
from mhla_core.ops.noncausal.state_config import default_state_config

SHAPES = {"Wan": (1, 12, 31500, 128, 150), "126K": (1, 12, 126000, 128, 600)}
TOKEN_KERNELS = ("state_kernel", "out_kernel", "bwd_q_kernel", "bwd_kv_kernel")
# changes to the default StateConfig: a dict changes fields of that launch setting, anything else is the value
VARIANTS = {
    "default": {},
    "state/out BLOCK_T 128": {"state_kernel": {"block_t": 128}, "out_kernel": {"block_t": 128}},
    "warps 4": {k: {"num_warps": 4} for k in TOKEN_KERNELS},
    "mix J64 C128": {"mix_kernel": {"block_j": 64, "block_c": 128}, "dw_kernel": {"block_c": 128}},
    "mix bf16": {"mix_prec_half": "bf16"},
    "stages 3": {k: {"num_stages": 3} for k in TOKEN_KERNELS},
}


def _inputs(shape):
    B, H, N, D, M = shape
    q, k, v = (torch.rand(B, N, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    W = torch.rand(M, M, device="cuda").requires_grad_()
    return q, k, v, W, N // M


def per_kernel(shape) -> list[tuple[str, float]]:
    q, k, v, W, L = _inputs(shape)
    dout = torch.randn_like(v)
    for _ in range(2):
        torch.autograd.grad(mhla(q, k, v, W, block_size=L, backend="triton"), [q, k, v, W], dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(mhla(q, k, v, W, block_size=L, backend="triton"), [q, k, v, W], dout)
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            times[e.key] += e.device_time_total / 5 / 1e3  # ms per fwd+bwd
    return sorted(times.items(), key=lambda kv: -kv[1])


def time_variant(q, k, v, W, L, dout, ref, cfg: NoncausalConfig) -> tuple[float, float, float]:
    """Forward and forward+backward medians (ms) and the forward's relative error against `ref`."""

    def fwd():
        return mhla(q, k, v, W, block_size=L, backend="triton", config=cfg)

    with torch.no_grad():
        err = ((fwd().float() - ref).norm() / ref.norm()).item()
        t_fwd = do_bench(fwd, return_mode="median")
    t_fb = do_bench(lambda: torch.autograd.grad(fwd(), [q, k, v, W], dout), return_mode="median")
    return t_fwd, t_fb, err


def variant_config(variant: dict, base: StateConfig) -> NoncausalConfig:
    """The config of one variant; the launchers' out-of-resources fallbacks start afresh."""
    changes = {name: replace(getattr(base, name), **value) if isinstance(value, dict) else value
               for name, value in variant.items()}
    LAUNCH.FALLBACK.clear()
    return NoncausalConfig(state=replace(base, **changes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    base = default_state_config()
    out = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n"]
    for name, shape in SHAPES.items():
        rows = per_kernel(shape)
        total = sum(t for _, t in rows)
        out.append(f"\n### Per-kernel CUDA time of one fwd+bwd, {name} {shape}: {total:.3f} ms\n")
        out.append("| kernel | ms | share |\n|---|---|---|")
        out += [f"| `{k[:70]}` | {t:.3f} | {100 * t / total:.0f}% |" for k, t in rows[:10]]
    out.append("\n### Launch variants (bf16, medians)\n\n| shape | variant | fwd ms | fwd+bwd ms | fwd rel err |\n"
               "|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        q, k, v, W, L = _inputs(shape)
        dout = torch.randn_like(v)
        with torch.no_grad():
            ref = mhla(q.float(), k.float(), v.float(), W, block_size=L, backend="torch")
        for vname, variant in VARIANTS.items():
            try:
                cfg = variant_config(variant, base)
                fwd, fb, err = time_variant(q, k, v, W, L, dout, ref, cfg)
                out.append(f"| {name} | {vname} | {fwd:.3f} | {fb:.3f} | {err:.1e} |")
            except Exception as e:  # a variant that does not compile is reported, not fatal
                out.append(f"| {name} | {vname} | error: {type(e).__name__} {str(e)[:50]} | | |")
            print(out[-1], flush=True)
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
