"""Which outputs of the parallel path go wrong with split head dims (`ParallelTiles.split_dims`), per Dk, Dv.

    python scripts/diag_split_dims.py        # CUDA; the same cases pass under TRITON_INTERPRET=1

Prints the relative errors of o, dq, dk, dv, dW against float64 (tests/core/test_noncausal_parallel.py's
`_errors`: q, k uniform, v, dO normal) for split and padded head dims, Dk and Dv split separately.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.core.test_noncausal_parallel import _errors, _tiles  # noqa: E402

CASES = [(72, 72), (72, 64), (64, 72), (80, 80), (96, 96)]


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for split_tail in ("mask", "window"):
            for dk, dv in CASES:
                for split in (False, True):
                    tiles = _tiles(64, 64, split_dims=split, split_tail=split_tail)
                    errs = _errors(1, 2, 16, 16, dk, dv, False, True, "exact", tiles, dtype=dtype, seed=1)
                    parts = " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv", "dW"), errs))
                    print(f"{str(dtype)[6:]:8s} tail {split_tail:6s} Dk {dk:3d} Dv {dv:3d} split {split!s:5s}: "
                          f"{parts}", flush=True)


if __name__ == "__main__":
    main()
