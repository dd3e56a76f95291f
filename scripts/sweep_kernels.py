"""Where the non-causal MHLA kernels spend their time, and a small launch-parameter sweep (CUDA).

    python scripts/sweep_kernels.py [--shapes Wan 126K ...] [--variants ...] [--profile default ...] [--markdown out.md]

1. Per-kernel CUDA time (torch.profiler) of one forward+backward at the first two shapes, for the
   variants named by --profile.
2. For variants of the state path's settings (`StateConfig`: launch tiles, `mix_prec_half`,
   `state_dtype`), each passed as `NoncausalConfig(state=...)`: forward and forward+backward medians
   (triton.testing.do_bench) and the relative errors of o and of the largest of the four gradients
   against the float64 PyTorch reference (q, k uniform in [0, 1), v and dO normal), at the
   state path's shapes of issue 12.
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

SHAPES = {"Wan": (1, 12, 31500, 128, 150), "126K": (1, 12, 126000, 128, 600),
          "DiT-XL/2 512": (16, 16, 1024, 72, 64), "DiT-XL/2 1024": (4, 16, 4096, 72, 256),
          "4K": (1, 12, 4096, 128, 64)}
TOKEN_KERNELS = ("state_kernel", "out_kernel", "bwd_q_kernel", "bwd_kv_kernel")
NORMS = {"exact": {}, "reference": {"normalizer": "reference"}, "none": {"normalize": False}}
WS = {"mix_impl": "stationary"}
# changes to the default StateConfig: a dict changes fields of that launch setting, anything else is the value
BEFORE = {"state_dtype": "float32", "mix_impl": "triton", "bwd_tf32_half": "always",
          "bwd_q_kernel": {"block_t": 32}}  # the defaults at the start of 2026-12-02
VARIANTS = {
    "default": {},
    "before (2026-12-02 start)": BEFORE,
    "fp32 states": {"state_dtype": "float32"},
    "stationary, fp32 I32 w4": {**WS, "mix_ws_kernel_fp32": {"block_i": 32, "num_warps": 4}},
    "stationary, fp32 I64": {**WS, "mix_ws_kernel_fp32": {"block_i": 64}},
    "tiled mix": {"mix_impl": "triton"},
    "mix matmul": {"mix_impl": "matmul"},  # cuBLAS: tf32 for fp32 states, bf16 for bf16 ones
    "mix matmul bf16": {"mix_impl": "matmul", "mix_prec_half": "bf16"},
    "no cuBLAS in auto": {"mix_matmul_m_multiple": 0},  # the defaults before cuBLAS mixing at M % 64 == 0
}

TINY = {"tiny": (1, 2, 40 * 3, 16, 40)}  # CPU smoke run under the interpreter (--tiny)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bench(fn) -> float:
    return do_bench(fn, return_mode="median") if DEVICE == "cuda" else float("nan")


def _inputs(shape):
    B, H, N, D, M = shape
    q, k = (torch.rand(B, N, H, D, device=DEVICE, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(B, N, H, D, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    W = torch.rand(M, M, device=DEVICE).requires_grad_()
    return q, k, v, W, N // M


def per_kernel(shape, cfg: NoncausalConfig, norm: dict) -> list[tuple[str, float]]:
    q, k, v, W, L = _inputs(shape)
    dout = torch.randn_like(v)

    def step():
        torch.autograd.grad(mhla(q, k, v, W, block_size=L, backend="triton", config=cfg, **norm), [q, k, v, W],
                            dout)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            times[e.key] += e.device_time_total / 5 / 1e3  # ms per fwd+bwd
    return sorted(times.items(), key=lambda kv: -kv[1])


def time_variant(q, k, v, W, L, dout, ref, cfg: NoncausalConfig, norm: dict) -> tuple[float, float, float, float]:
    """Forward and forward+backward medians (ms), the output's and the largest gradient's relative error
    against `ref` (o, dq, dk, dv, dW of the float64 reference)."""

    def fwd():
        return mhla(q, k, v, W, block_size=L, backend="triton", config=cfg, **norm)

    out = fwd()
    grads = torch.autograd.grad(out, [q, k, v, W], dout)
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip([out, *grads], ref)]
    del out, grads
    with torch.no_grad():
        t_fwd = _bench(fwd)
    t_fb = _bench(lambda: torch.autograd.grad(fwd(), [q, k, v, W], dout))
    return t_fwd, t_fb, errs[0], max(errs[1:])


def reference(q, k, v, W, L, dout, norm: dict) -> list[torch.Tensor]:
    """o and the four gradients of the float64 PyTorch reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, W)]
    out = mhla(*leaves, block_size=L, backend="torch", **norm)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return [out.detach(), *grads]


def variant_config(variant: dict, base: StateConfig) -> NoncausalConfig:
    """The config of one variant; the launchers' out-of-resources fallbacks start afresh."""
    changes = {name: replace(getattr(base, name), **value) if isinstance(value, dict) else value
               for name, value in variant.items()}
    LAUNCH.FALLBACK.clear()
    return NoncausalConfig(path="state", state=replace(base, **changes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--norm", choices=list(NORMS), default="exact", help="normaliser of every call")
    ap.add_argument("--tiny", action="store_true", help="one tiny shape, no timing, no profile (interpreter)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile", nargs="*", default=["default"], choices=list(VARIANTS),
                    help="variants whose per-kernel CUDA time is listed (at the first two shapes)")
    args = ap.parse_args()
    shapes = TINY if args.tiny else {name: SHAPES[name] for name in args.shapes}
    base = default_state_config()
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreter)"
    out = [f"{card}, torch {torch.__version__}\n"]
    for pname in [] if args.tiny else args.profile:
        for name, shape in list(shapes.items())[:2]:
            rows = per_kernel(shape, variant_config(VARIANTS[pname], base), NORMS[args.norm])
            total = sum(t for _, t in rows)
            out.append(f"\n### Per-kernel CUDA time of one fwd+bwd, {name} {shape}, {pname}: {total:.3f} ms\n")
            out.append("| kernel | ms | share |\n|---|---|---|")
            out += [f"| `{k[:70]}` | {t:.3f} | {100 * t / total:.0f}% |" for k, t in rows[:10]]
            print("\n".join(out[-12:]), flush=True)
    out.append(f"\n### Launch variants (bf16, normaliser {args.norm}, medians; errors vs float64)\n\n"
               "| shape | variant | fwd ms | fwd+bwd ms | o rel err | largest grad rel err |\n"
               "|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        q, k, v, W, L = _inputs(shape)
        dout = torch.randn_like(v)
        ref = reference(q, k, v, W, L, dout, NORMS[args.norm])
        for vname in args.variants:
            try:
                cfg = variant_config(VARIANTS[vname], base)
                fwd, fb, err, gerr = time_variant(q, k, v, W, L, dout, ref, cfg, NORMS[args.norm])
                out.append(f"| {name} | {vname} | {fwd:.3f} | {fb:.3f} | {err:.1e} | {gerr:.1e} |")
            except Exception as e:  # a variant that does not compile is reported, not fatal
                out.append(f"| {name} | {vname} | error: {type(e).__name__} {str(e)[:50]} | | | |")
            print(out[-1], flush=True)
        del ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
