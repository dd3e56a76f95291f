"""Kernel launch with an out-of-resources fallback, shared by the non-causal state-path launchers."""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources


def strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def block_positions(q: torch.Tensor, rowmap: torch.Tensor | None) -> int:
    """Block-major token positions M L: N, or more when a grid layout pads its blocks."""
    return q.shape[1] if rowmap is None else rowmap.numel()


def rowmap_args(rowmap: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(map pointer, GRID) of a launch: a grid layout's row map, or any tensor (unread) for block-major tokens."""
    return (fallback, False) if rowmap is None else (rowmap, True)


# (kernel name, constexprs) -> constexpr / launch overrides found after an out-of-resources failure
FALLBACK: dict[tuple, dict] = {}


def launch(kernel, grid, args, consts: dict, cfg: dict) -> None:
    """kernel[grid](*args, **consts, **cfg); on shared-memory overflow, retry with a smaller token
    tile (when the kernel loops over tokens) and then with one pipeline stage."""
    run = {**consts, **cfg}
    key = None
    if FALLBACK:
        key = launch_key(kernel, args, consts, cfg)
        run.update(FALLBACK.get(key, {}))
    while True:
        try:
            kernel[grid](*args, **run)
            return
        except OutOfResources:
            if run.get("BLOCK_T", 16) > 16 and not run.get("DIRECT", False):
                run["BLOCK_T"] //= 2
            elif run.get("num_stages", 1) > 1:
                run["num_stages"] = 1
            else:
                raise
            key = key or launch_key(kernel, args, consts, cfg)
            FALLBACK[key] = {n: run[n] for n in ("BLOCK_T", "num_stages") if n in run}


def launch_key(kernel, args, consts: dict, cfg: dict) -> tuple:
    return (kernel.fn.__name__, tuple(sorted(consts.items())), tuple(sorted(cfg.items())),
            tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
