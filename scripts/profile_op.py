"""Per-kernel CUDA time of one non-causal MHLA forward + backward (torch.profiler), for one shape.

    python scripts/profile_op.py --shape 128 3 256 64 16 [--path parallel] [--normalizer exact]
    python scripts/profile_op.py --shape 32 16 256 72 16 --grid 16 16 --blocks 4 4 [--copies]

With --grid / --blocks the tokens are in row-major grid order and q, k, v are strided views of one
[B, N, 3, H, D] tensor (as the MHLA layer's qkv projection gives); the op reads the grid order itself
(`layout=`), or with --copies the inputs are permuted by `BlockLayout.to_blocks` first (the layer
before grid-order addressing). N and M of --shape must match the layout.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import BlockLayout, NoncausalConfig, mhla  # noqa: E402
from mhla_core.ops.noncausal.parallel import ParallelTiles  # noqa: E402
from scripts.bench_layout import _copies, _grid_order  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=5, metavar=("B", "H", "N", "D", "M"), required=True)
    ap.add_argument("--path", default="auto", choices=["auto", "parallel", "state"])
    ap.add_argument("--normalizer", default="exact")
    ap.add_argument("--grid", type=int, nargs="+", default=None, help="token grid (row-major order)")
    ap.add_argument("--blocks", type=int, nargs="+", default=None, help="blocks per grid axis")
    ap.add_argument("--copies", action="store_true", help="with --grid: to_blocks / from_blocks around the op")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--gather", default="auto", choices=["auto", "always", "never"],
                    help="with --grid: NoncausalConfig.grid_gather (gather in the kernels or permute first)")
    ap.add_argument("--w-mode", default="auto", help="ParallelTiles.w_mode of the parallel path")
    args = ap.parse_args()
    B, H, N, D, M = args.shape
    cfg = NoncausalConfig(path=args.path, grid_gather=args.gather, parallel=ParallelTiles(w_mode=args.w_mode))
    w = torch.rand(M, M, device="cuda").requires_grad_()
    if args.grid is None:
        q, k, v = (torch.rand(B, N, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        leaves = [q, k, v, w]

        def op():
            return mhla(q, k, v, w, block_size=N // M, normalizer=args.normalizer, config=cfg)
    else:
        if args.blocks is None:
            ap.error("--grid needs --blocks")
        layout = BlockLayout(tuple(args.grid), tuple(args.blocks))
        if layout.num_tokens != N or layout.num_blocks != M:
            ap.error(f"--shape N={N}, M={M} disagree with {layout!r} ({layout.num_tokens} tokens, "
                     f"{layout.num_blocks} blocks)")
        qkv = torch.rand(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        q, k, v = qkv.unbind(dim=2)
        leaves = [qkv, w]

        op = partial(_copies if args.copies else _grid_order, q, k, v, w, layout,
                     dict(normalizer=args.normalizer, config=cfg))

    def step():
        o = op()
        torch.autograd.grad(o, leaves, torch.ones_like(o))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    where = "" if args.grid is None else f", grid {args.grid} blocks {args.blocks}" + (" with copies" if args.copies
                                                                                         else " (layout=)")
    print(f"shape {args.shape}, path {args.path}{where}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
