"""The non-causal MHLA layer for 1D, 2D and 3D token grids (vision, image and video generation)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mhla_core.constraint import register_constrained
from mhla_core.layout import BlockLayout, cached_layout
from mhla_core.mixing import block_distance_mixing
from mhla_core.ops.noncausal import NORMALIZERS, mhla

CONSTRAINTS = ("none", "clamp01")
FEATURE_EPS = 1e-6


def _per_axis(x: int | tuple[int, ...] | None, ndim: int, name: str) -> tuple[int, ...] | None:
    if x is None:
        return None
    t = (x,) * ndim if isinstance(x, int) else tuple(x)
    if len(t) != ndim:
        raise ValueError(f"{name} {x!r} must give one value per grid axis ({ndim})")
    return t


class MHLA(nn.Module):
    """Multi-head linear attention with token-level blocks mixed by a learnable matrix.

    Tokens arrive as [B, N, C] in row-major order of `grid` and leave in the same order.
    Blocks are tiles of the grid: give `blocks` (blocks per axis) or `block_tokens` (tokens per
    block per axis, which needs `grid` at construction). A grid the blocks do not divide is padded
    with zero key/value tokens (see `BlockLayout`); the op reads the grid order itself, so the
    layer makes no block-order copies.

    Args:
        dim: channels C. num_heads: heads H (C must divide).
        grid: default token grid, (N,), (H, W) or (F, H, W); `forward` may pass another of the
            same block count.
        blocks / block_tokens: the block configuration (exactly one).
        transform, local_thres, exp_sigma: the mixing initialiser (`block_distance_mixing`).
        mixing_trainable: learn the mixing (else a frozen buffer). per_head_mixing: one matrix per head.
        mixing_constraint: "none" or "clamp01", applied by `constrain_mixing()` after every step
            of any torch optimiser that updates the mixing (`mhla_core.constraint`).
        qkv_bias: bias of the qkv projection. qk_norm: RMSNorm over q and k (full width)
            before the feature map relu(x) + 1e-6.
        normalize, normalizer, scale, eps: passed to `mhla` (scale defaults to 1.0, as in the
            reference vision code).
        lepe_kernel: kernel size of the depthwise conv of v over the grid added to the output
            (None: no LePE).
        gate: multiply the per-head RMS-normalised output by SiLU(W_g x).
        proj_drop: dropout after the output projection.
        backend: the op backend ("auto", "triton" or "torch").
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        grid: tuple[int, ...] | None = None,
        blocks: int | tuple[int, ...] | None = None,
        block_tokens: int | tuple[int, ...] | None = None,
        transform: str = "linear",
        local_thres: float = 1.5,
        exp_sigma: float = 3.0,
        mixing_trainable: bool = True,
        per_head_mixing: bool = False,
        mixing_constraint: str = "none",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        normalize: bool = True,
        normalizer: str = "exact",
        scale: float | None = 1.0,
        eps: float = 1e-6,
        lepe_kernel: int | None = None,
        gate: bool = False,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if (blocks is None) == (block_tokens is None):
            raise ValueError("give exactly one of blocks= (blocks per axis) or block_tokens=")
        if mixing_constraint not in CONSTRAINTS:
            raise ValueError(f"mixing_constraint must be one of {CONSTRAINTS}, got {mixing_constraint!r}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if block_tokens is not None and grid is None:
            raise ValueError("block_tokens= needs grid= to know the number of blocks")
        if lepe_kernel is not None and (not isinstance(lepe_kernel, int) or lepe_kernel < 1 or lepe_kernel % 2 == 0):
            raise ValueError(f"lepe_kernel must be an odd int >= 1 (a same-size convolution) or None, "
                             f"got {lepe_kernel!r}")
        ndim = len(grid) if grid is not None else (1 if isinstance(blocks, int) else len(blocks))
        if block_tokens is not None:
            tokens = _per_axis(block_tokens, ndim, "block_tokens")
            blocks = tuple(math.ceil(g / t) for g, t in zip(grid, tokens))
        self.blocks = _per_axis(blocks, ndim, "blocks")
        self.grid = tuple(grid) if grid is not None else None
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.normalize, self.normalizer, self.scale, self.eps = normalize, normalizer, scale, eps
        self.mixing_constraint, self.backend = mixing_constraint, backend

        block_grid = BlockLayout(self.blocks, self.blocks)  # distances depend on the block grid only
        w = block_distance_mixing(block_grid, transform, local_thres=local_thres, exp_sigma=exp_sigma)
        if per_head_mixing:
            w = w.unsqueeze(0).repeat(num_heads, 1, 1)
        if mixing_trainable:
            self.mixing = nn.Parameter(w)
            if mixing_constraint != "none":  # projected after every optimiser step, whoever trains it
                register_constrained(self)
        else:
            self.register_buffer("mixing", w)

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        self.lepe = (
            conv(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        )
        self.gate = nn.Linear(dim, dim) if gate else None
        self.out_norm = nn.RMSNorm(self.head_dim) if gate else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._layouts: dict[tuple[int, ...], BlockLayout] = {}

    @property
    def num_blocks(self) -> int:
        return math.prod(self.blocks)

    def layout(self, grid: tuple[int, ...]) -> BlockLayout:
        """The (cached) BlockLayout of this layer's blocks over `grid`."""
        grid = tuple(grid)
        if grid not in self._layouts:
            if len(grid) != len(self.blocks):
                raise ValueError(f"grid {grid} has {len(grid)} axes, the layer's blocks {self.blocks} have "
                                 f"{len(self.blocks)}")
            self._layouts[grid] = cached_layout(grid, self.blocks)  # shared: one device index per grid
        return self._layouts[grid]

    @torch.no_grad()
    def constrain_mixing(self) -> None:
        """Apply the mixing constraint in place (runs after each optimiser step by `mhla_core.constraint`)."""
        if self.mixing_constraint == "clamp01":
            self.mixing.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """x: [B, N, C] in row-major order of `grid` (default: the grid given at construction)."""
        grid = grid if grid is not None else self.grid
        if grid is None:
            raise ValueError("forward needs grid= (no default grid was given at construction)")
        B, N, C = x.shape
        if N != math.prod(grid) or C != self.dim:
            raise ValueError(f"x is {tuple(x.shape)}, expected [B, {math.prod(grid)}, {self.dim}] for grid {grid}")
        layout = self.layout(grid)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = F.relu(self.q_norm(q)) + FEATURE_EPS
        k = F.relu(self.k_norm(k)) + FEATURE_EPS
        heads = (B, N, self.num_heads, self.head_dim)
        o = mhla(  # tokens stay in grid order: the op addresses the blocks itself
            q.reshape(heads),
            k.reshape(heads),
            v.reshape(heads),
            self.mixing,
            layout=layout,
            normalize=self.normalize,
            normalizer=self.normalizer,
            eps=self.eps,
            scale=self.scale,
            backend=self.backend,
        )
        if self.gate is not None:
            o = self.out_norm(o) * F.silu(self.gate(x)).reshape(heads)
        o = o.reshape(B, N, C)
        if self.lepe is not None:
            v_grid = v.transpose(1, 2).reshape(B, C, *grid)
            o = o + self.lepe(v_grid).reshape(B, C, N).transpose(1, 2)
        return self.proj_drop(self.proj(o))


def constrain_mixing(model: nn.Module) -> None:
    """Apply the mixing constraint of every MHLA layer inside `model` now (the optimiser-step hook of
    `mhla_core.constraint` does it after every step by itself)."""
    for m in model.modules():
        if isinstance(m, MHLA):
            m.constrain_mixing()
