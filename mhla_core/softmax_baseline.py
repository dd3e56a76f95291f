"""The same-block softmax baseline: `MHLA`'s layer with softmax attention in place of the linear attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftmaxBaseline(nn.Module):
    """Softmax self-attention with the projections of `mhla_core.MHLA` over a 2D token grid: qkv, q/k RMSNorm
    over the full width, `F.scaled_dot_product_attention` (scale head_dim ** -0.5), LePE of v, output projection.

    Sub-modules are created in MHLA's order under MHLA's names (no blocks, no mixing), so a state dict moves
    between the two (MHLA's `mixing` aside) and one seed gives both the same initial weights.

    Args:
        dim: channels C. num_heads: heads H (C must divide).
        grid: default (H, W) token grid; `forward` may pass another.
        qkv_bias, qk_norm, lepe_kernel, proj_drop: as `MHLA`'s.
        attn_drop: dropout of the attention probabilities (in training only).
    """

    def __init__(self, dim: int, num_heads: int, *, grid: tuple[int, int] | None = None, qkv_bias: bool = False,
                 qk_norm: bool = False, lepe_kernel: int | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if lepe_kernel is not None and (not isinstance(lepe_kernel, int) or lepe_kernel < 1 or lepe_kernel % 2 == 0):
            raise ValueError(f"lepe_kernel must be an odd int >= 1 (a same-size convolution) or None, "
                             f"got {lepe_kernel!r}")
        self.grid = tuple(grid) if grid is not None else None
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def set_grid(self, grid: Sequence[int]) -> None:
        """Make `grid` the default grid."""
        self.grid = tuple(grid)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [B, N, C] in row-major order of `grid` (default: `self.grid`) -> [B, N, C]."""
        grid = tuple(grid) if grid is not None else self.grid
        if grid is None:
            raise ValueError("forward needs grid= (no default grid was given at construction)")
        B, N, C = x.shape
        if N != math.prod(grid) or C != self.dim:
            raise ValueError(f"x is {tuple(x.shape)}, expected [B, {math.prod(grid)}, {self.dim}] for grid {grid}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, N, C)
        if self.lepe is not None:
            o = o + self.lepe(v.transpose(1, 2).reshape(B, C, *grid)).reshape(B, C, N).transpose(1, 2)
        return self.proj_drop(self.proj(o))
