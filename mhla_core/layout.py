"""BlockLayout: permute a row-major token grid into block-major order and back (docs/spec.md section 3)."""

from __future__ import annotations

import math
from functools import cached_property, lru_cache

import torch
import torch.nn.functional as F


def _as_tuple(x: int | tuple[int, ...] | list[int], name: str) -> tuple[int, ...]:
    t = (x,) if isinstance(x, int) else tuple(int(a) for a in x)
    if not 1 <= len(t) <= 3 or any(a < 1 for a in t):
        raise ValueError(f"{name} must be 1 to 3 positive ints, got {x!r}")
    return t


class BlockLayout:
    """Tiles a 1D, 2D or 3D token grid into `blocks` tiles per axis.

    `to_blocks` maps [B, N, ...] in row-major grid order to [B, M * L, ...] in block-major order
    (blocks row-major over the block grid, tokens row-major inside a tile). A grid the blocks do
    not divide is padded at the end of each axis with zero tokens; `from_blocks` drops them.

    Args:
        grid: token grid (N,), (H, W) or (F, H, W).
        blocks: number of blocks along each axis (an int for every axis of a 1D grid).
    """

    def __init__(self, grid: tuple[int, ...], blocks: tuple[int, ...] | int) -> None:
        self.grid = _as_tuple(grid, "grid")
        self.blocks = _as_tuple(blocks, "blocks")
        if len(self.blocks) != len(self.grid):
            raise ValueError(f"blocks {self.blocks} must have one entry per axis of grid {self.grid}")
        if any(b > g for b, g in zip(self.blocks, self.grid)):
            raise ValueError(f"blocks {self.blocks} cannot exceed the grid {self.grid} on any axis")
        self.tile = tuple(math.ceil(g / b) for g, b in zip(self.grid, self.blocks))
        self.padded_grid = tuple(t * b for t, b in zip(self.tile, self.blocks))
        self._index_on: dict[torch.device, torch.Tensor] = {}  # token_index per device (no lock: compile-safe)
        # to_blocks splits axis a into (blocks_a, tile_a) and moves every tile axis after every block
        # axis; the order is unchanged when the axes of size > 1 keep their sequence
        split = [(n, f"{kind}{a}") for a, (b, t) in enumerate(zip(self.blocks, self.tile))
                 for n, kind in ((b, "b"), (t, "t"))]
        kept = [name for n, name in split if n > 1]
        moved = [name for n, name in sorted(split, key=lambda x: x[1][0]) if n > 1]
        #: True when row-major grid order already is block-major order (e.g. an undivided 1D grid)
        self.is_block_major = not self.is_padded and kept == moved

    def __repr__(self) -> str:
        return f"BlockLayout(grid={self.grid}, blocks={self.blocks}, tile={self.tile})"

    @property
    def num_blocks(self) -> int:
        """M, the number of blocks."""
        return math.prod(self.blocks)

    @property
    def block_size(self) -> int:
        """L, tokens per block, padding included."""
        return math.prod(self.tile)

    @property
    def num_tokens(self) -> int:
        """N, real tokens in the grid."""
        return math.prod(self.grid)

    @property
    def is_padded(self) -> bool:
        return self.padded_grid != self.grid

    def token_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int32 [M * L]: the row-major grid index of the token at each block-major position (-1 for
        padding), the addressing the kernels use instead of `to_blocks`; cached per device."""
        device = torch.device(device)
        idx = self._index_on.get(device)
        if idx is None:
            rows = torch.arange(1, self.num_tokens + 1, device=device).view(1, -1)
            idx = self._index_on[device] = (self.to_blocks(rows).view(-1) - 1).to(torch.int32)
        return idx

    def _check(self, x: torch.Tensor, n: int, what: str) -> None:
        if x.dim() < 2 or x.shape[1] != n:
            raise ValueError(
                f"{what} expects [B, {n}, ...] for {self!r}, got shape {tuple(x.shape)}"
            )

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] row-major -> [B, M * L, ...] block-major (padding tokens are zero)."""
        self._check(x, self.num_tokens, "to_blocks")
        B, rest, d = x.shape[0], x.shape[2:], len(self.grid)
        x = x.reshape(B, *self.grid, -1)
        if self.is_padded:
            pad = []
            for g, pg in zip(reversed(self.grid), reversed(self.padded_grid)):
                pad += [0, pg - g]
            x = F.pad(x, [0, 0] + pad)
        split = [B]
        for b, t in zip(self.blocks, self.tile):
            split += [b, t]
        x = x.reshape(*split, -1)
        order = [0] + [1 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)] + [1 + 2 * d]
        return x.permute(order).reshape(B, self.num_blocks * self.block_size, *rest)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M * L, ...] block-major -> [B, N, ...] row-major, padding dropped."""
        self._check(x, self.num_blocks * self.block_size, "from_blocks")
        B, rest, d = x.shape[0], x.shape[2:], len(self.grid)
        x = x.reshape(B, *self.blocks, *self.tile, -1)
        order = [0]
        for a in range(d):
            order += [1 + a, 1 + d + a]
        x = x.permute(order + [1 + 2 * d]).reshape(B, *self.padded_grid, -1)
        if self.is_padded:
            x = x[(slice(None),) + tuple(slice(0, g) for g in self.grid)]
        return x.reshape(B, self.num_tokens, *rest)

    @cached_property
    def _centres(self) -> torch.Tensor:
        axes = [torch.arange(b, dtype=torch.float64) + 0.5 for b in self.blocks]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)  # [M, d], row-major block order

    def distances(self) -> torch.Tensor:
        """[M, M] float64 Euclidean distances between block centres, in block units."""
        return torch.cdist(self._centres, self._centres)


@lru_cache(maxsize=64)
def cached_layout(grid: tuple[int, ...], blocks: tuple[int, ...]) -> BlockLayout:
    """One shared `BlockLayout` per (grid, blocks), so its device token index is built once."""
    return BlockLayout(grid, blocks)
