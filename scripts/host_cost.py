"""Host time of one non-causal `mhla()` call with the Triton launches stubbed out (no GPU needed).

    python scripts/host_cost.py [--shape 1 3 256 64 16] [--path auto] [--reps 300] [--profile]
    ROOT=/path/to/other/checkout python scripts/host_cost.py     # the same harness on another version

Every Triton launch is replaced by a no-op, so what is timed is the Python and PyTorch work around the
kernels: argument checks, planning, allocations, strides, casts and autograd. Inputs are small CPU tensors
(the host work does not depend on the batch). Prints microseconds per forward (no grad) and per
forward + backward; --profile adds a cProfile table. The kernels' own launch cost (Triton's binder and
launcher) is not included: it needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the launches are stubbed, not interpreted")

sys.path.insert(0, os.environ.get("ROOT", str(Path(__file__).resolve().parents[1])))

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from mhla_core import NoncausalConfig, mhla  # noqa: E402


def per_call_us(fn, reps: int) -> float:
    """Median-free mean of `reps` calls after a warm-up, in microseconds."""
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=5, default=[1, 3, 256, 64, 16], metavar=("B", "H", "N", "D", "M"))
    ap.add_argument("--path", default="auto", choices=["auto", "parallel", "state"])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    B, H, N, D, M = args.shape
    if N % M:
        ap.error(f"N = {N} is not a multiple of M = {M}")
    JITFunction.run = lambda self, *a, grid, warmup, **k: None  # every kernel launch becomes a no-op
    cfg = NoncausalConfig(path=args.path)
    q, k, v = (torch.rand(B, N, H, D, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    w = torch.rand(M, M).requires_grad_()
    g = torch.randn(B, N, H, D, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            mhla(q, k, v, w, block_size=N // M, backend="triton", config=cfg)

    def fwd_bwd():
        o = mhla(q, k, v, w, block_size=N // M, backend="triton", config=cfg)
        torch.autograd.grad(o, [q, k, v, w], g)

    print(f"host us per call, shape {tuple(args.shape)}, path {args.path}: fwd {per_call_us(fwd, args.reps):.1f}, "
          f"fwd+bwd {per_call_us(fwd_bwd, args.reps):.1f}")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            fwd_bwd()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
