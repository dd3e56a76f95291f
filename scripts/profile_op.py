"""Per-kernel CUDA time of one non-causal MHLA forward + backward (torch.profiler), for one shape.

    python scripts/profile_op.py --shape 128 3 256 64 16 [--path parallel] [--normalizer exact]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import NoncausalConfig, mhla  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=5, metavar=("B", "H", "N", "D", "M"), required=True)
    ap.add_argument("--path", default="auto", choices=["auto", "parallel", "state"])
    ap.add_argument("--normalizer", default="exact")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    B, H, N, D, M = args.shape
    q, k, v = (torch.rand(B, N, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    w = torch.rand(M, M, device="cuda").requires_grad_()
    cfg = NoncausalConfig(path=args.path)

    def step():
        o = mhla(q, k, v, w, block_size=N // M, normalizer=args.normalizer, config=cfg)
        torch.autograd.grad(o, [q, k, v, w], torch.ones_like(o))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"shape {args.shape}, path {args.path}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
