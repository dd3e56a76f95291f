"""Initialisers of the block mixing matrix (docs/spec.md sections 2 and 4)."""

from __future__ import annotations

import math

import torch

from mhla_core.layout import BlockLayout

TRANSFORMS = ("linear", "cos", "exp", "gaussian", "local")


def block_distance_mixing(
    layout: BlockLayout,
    transform: str = "linear",
    *,
    local_thres: float = 1.5,
    exp_sigma: float = 3.0,
) -> torch.Tensor:
    """[M, M] float32 mixing matrix from the distances between block centres.

    `linear`, `cos`, `exp` and `local` are column-normalised (each column sums to one);
    `gaussian` is not. One block gives [[1]] for every transform.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if transform == "exp" and not exp_sigma > 0:
        raise ValueError(f"exp_sigma must be > 0 for transform='exp', got {exp_sigma!r}")
    if transform == "local" and not local_thres >= 0:
        raise ValueError(f"local_thres must be >= 0 for transform='local' (block units), got {local_thres!r}")
    dist = layout.distances()
    dmax = float(dist.max())
    if dmax == 0.0:  # a single block
        return torch.ones(1, 1)
    if transform == "linear":
        w = 1.0 - dist / dmax
    elif transform == "cos":
        w = torch.cos(dist / dmax * math.pi / 4)
    elif transform == "exp":
        w = torch.exp(-dist / exp_sigma)
    elif transform == "gaussian":
        sigma = dmax / 3
        w = torch.exp(-(dist**2) / (2 * sigma**2))
    else:
        w = (dist <= local_thres).to(dist.dtype)
    if transform != "gaussian":
        w = w / w.sum(dim=0, keepdim=True)
    return w.float()


def causal_mixing_init(num_chunks: int) -> torch.Tensor:
    """[L, L] lower-triangular mixing with W[i, j] = 1 / (i + 1) for j <= i (the reference init)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be positive, got {num_chunks}")
    rows = torch.arange(num_chunks, dtype=torch.float32)
    return torch.ones(num_chunks, num_chunks).tril() / (rows + 1).unsqueeze(1)
