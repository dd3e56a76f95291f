"""One seeded step order for every trainer: each draw of step `i` comes from (seed, step, rank, micro-batch)."""

from __future__ import annotations

import functools
import random

import numpy as np
import torch


def step_seed(seed: int, step: int, rank: int = 0, micro: int = 0) -> int:
    """The seed of one micro-batch of one step on one rank (a pure function: resume replays it)."""
    return (((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro) % (2**63 - 1)


def seed_all(value: int) -> None:
    """Seed torch (CPU and CUDA), numpy and `random` from one integer."""
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def seed_step(seed: int, step: int, rank: int = 0, micro: int = 0) -> None:
    """`seed_all(step_seed(...))`: call at the start of every micro-batch."""
    seed_all(step_seed(seed, step, rank, micro))


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The sample order of one epoch: a permutation of range(n) seeded by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n, generator=gen).tolist())


def sample_indices(first: int, count: int, n: int, seed: int) -> list[int]:
    """Samples `first .. first + count` of the endless stream of epoch permutations (epochs wrap)."""
    out = []
    for g in range(first, first + count):
        epoch, i = divmod(g, n)
        out.append(epoch_permutation(n, seed, epoch)[i])
    return out
