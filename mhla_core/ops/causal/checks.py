"""Input checks shared by the causal MHLA ops."""

from __future__ import annotations

import math

import torch


def check_length(num_tokens_end: int, chunk_size: int, mixing_size: int) -> None:
    """Raise ValueError if position `num_tokens_end` lies past the chunks the mixing covers."""
    needed = math.ceil(num_tokens_end / chunk_size)
    if needed > mixing_size:
        raise ValueError(
            f"a sequence of {num_tokens_end} tokens needs {needed} chunks of {chunk_size}, "
            f"but the mixing matrix is {mixing_size} x {mixing_size} ({mixing_size * chunk_size} tokens); "
            f"use a mixing of at least {needed} chunks (causal_mixing_init({needed})) "
            f"or chunk_size >= {math.ceil(num_tokens_end / mixing_size)}"
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, num_tokens: int) -> list[int]:
    """Validate fla-style cumulative sequence lengths; return them as Python ints."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs q of shape [1, T, H, D] (packed), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to T = {num_tokens} without decreasing, got {bounds}"
        )
    return bounds
