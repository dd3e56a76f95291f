"""The layers of the classification ViTs: the paper's image padding, the attention of the MHLA block (MHLA, or
softmax with the same projections), the block, and the resampling of a mixing matrix to another block grid.

Every layer that depends on the patch grid takes it at `forward(x, grid)` (the grid of this batch, which
`dynamic_img_size` may change) and has `set_grid(grid)` (a new default grid, used by `set_input_size`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed
from torch.func import functional_call

from mhla_core import MHLA
from mhla_core.layout import BlockLayout, cached_layout
from mhla_core.softmax_baseline import SoftmaxBaseline

PAPER_PAD = {224: 256}  # image sides the paper zero-pads to a grid its 4x4-token blocks divide


def pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """`size` as (height, width): an int, or a pair of ints (a tuple, or a list as a JSON config gives it)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{name} must be an int or a pair (height, width) of positive ints, got {size!r}")


def padded_size(size: Sequence[int]) -> tuple[int, ...]:
    """The size the paper zero-pads an image of `size` to, side by side (224 -> 256; other sides unchanged)."""
    return tuple(PAPER_PAD.get(s, s) for s in size)


class CenterPadPatchEmbed(PatchEmbed):
    """PatchEmbed that first zero-pads the image, centred, as the paper does (`padded_size`: 224 -> 256 per side).

    `image_size` is the size of the images the model takes, timm's `img_size` the padded size the patch grid
    covers. With a fixed input size an image smaller than `img_size` is padded up to it (when this size pads at
    all); with `dynamic_img_size` every image is padded by `padded_size` of its own size.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 **kwargs) -> None:
        image = pair(img_size, "img_size")
        super().__init__(img_size=padded_size(image), patch_size=patch_size, **kwargs)
        self.image_size = image

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """timm's `set_input_size`, with `img_size` the image size (before padding)."""
        if img_size is not None:
            self.image_size = pair(img_size, "img_size")
        super().set_input_size(img_size=padded_size(self.image_size), patch_size=patch_size)

    def padding(self, size: Sequence[int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right): the zero rows and columns added to an image of `size` (H, W)."""
        H, W = int(size[0]), int(size[1])
        if not self.strict_img_size:
            th, tw = padded_size((H, W))
        elif tuple(self.img_size) != self.image_size:
            th, tw = self.img_size
        else:
            th, tw = H, W  # this size is not padded; PatchEmbed checks it
        if H > th or W > tw:
            raise ValueError(f"image {H}x{W} is larger than the padded size {th}x{tw}")
        return (th - H) // 2, th - H - (th - H) // 2, (tw - W) // 2, tw - W - (tw - W) // 2

    def image_tokens(self, size: Sequence[int]) -> tuple[slice, slice]:
        """The rows and columns of the patch grid that hold pixels of an image of `size` (the others hold padding
        only): 1:15 and 1:15 of the 16x16 grid of a 224 px image."""
        top, _, left, _ = self.padding(size)
        (ph, pw), (H, W) = self.patch_size, size
        return slice(top // ph, -(-(top + H) // ph)), slice(left // pw, -(-(left + W) // pw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.padding(x.shape[-2:])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def tile_blocks(grid: Sequence[int], piece_size: int, pad_tokens: bool = True) -> tuple[int, ...]:
    """Blocks per axis when every block is a tile of `piece_size` tokens per axis (the last one smaller, padded
    with zero tokens, where `piece_size` does not divide the grid: only with `pad_tokens`)."""
    grid = tuple(grid)
    if not pad_tokens and any(g % piece_size for g in grid):
        raise ValueError(f"a {'x'.join(map(str, grid))} patch grid is not divisible by piece_size={piece_size} and "
                         f"token padding is off; use pad_tokens=True or a piece_size dividing "
                         f"{' and '.join(str(g) for g in grid if g % piece_size)}")
    return tuple(math.ceil(g / piece_size) for g in grid)


def resample_mixing(mixing: torch.Tensor, old_blocks: Sequence[int], new_blocks: Sequence[int]) -> torch.Tensor:
    """A mixing matrix of block grid `old_blocks` resampled to `new_blocks`, like an image: linear interpolation
    (bilinear for a 2D block grid; align_corners=False, no antialiasing) over the grid of the query blocks (rows)
    and over that of the key blocks (columns). Takes [M, M] or [H, M, M] (one matrix per head).

    Every entry is a convex combination of old entries, so values stay in the old range (a clamp01 constraint
    still holds). Sums over blocks grow or shrink with the block count; with the normaliser on (the default)
    MHLA's output does not depend on the scale of W, so nothing is rescaled. The same block grid returns
    `mixing` itself.
    """
    old, new = tuple(old_blocks), tuple(new_blocks)
    M, N = math.prod(old), math.prod(new)
    if mixing.dim() not in (2, 3) or tuple(mixing.shape[-2:]) != (M, M):
        raise ValueError(f"mixing {tuple(mixing.shape)} does not fit the block grid {old} (expected [{M}, {M}] "
                         f"or [heads, {M}, {M}])")
    if len(new) != len(old):
        raise ValueError(f"new_blocks {new} must have one entry per axis of old_blocks {old}")
    if old == new:
        return mixing
    mode = ("linear", "bilinear", "trilinear")[len(old) - 1]
    w = mixing.reshape(-1, M, M)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()  # interpolate needs a full-precision float
    heads = w.shape[0]

    def over_columns(w: torch.Tensor) -> torch.Tensor:  # [heads, rows, M] -> [heads, rows, N]
        rows = w.shape[1]
        out = F.interpolate(w.reshape(heads * rows, 1, *old), size=new, mode=mode, align_corners=False)
        return out.reshape(heads, rows, N)

    w = over_columns(over_columns(w).transpose(1, 2)).transpose(1, 2)  # keys, then queries
    return w.reshape(*mixing.shape[:-2], N, N).to(mixing.dtype)


class TiledMHLA(MHLA):
    """`mhla_core.MHLA` whose blocks are tiles of `piece_size` x `piece_size` tokens on every grid (with
    `piece_size=None` the block count is fixed instead: one block for linear attention).

    The mixing parameter belongs to the block grid `self.blocks`, that of the default grid `self.grid`.
    `set_grid` moves the layer to a new default grid; when its block grid differs, the mixing is replaced by
    `resample_mixing` of it. `forward(x, grid)` on a grid of another block grid uses the mixing resampled on
    the fly (differentiably: the stored mixing learns), so both give the same result.
    """

    def __init__(self, dim: int, num_heads: int, *, grid: tuple[int, int], piece_size: int | None,
                 pad_tokens: bool = True, blocks: tuple[int, int] | None = None, **mhla_kwargs) -> None:
        if (piece_size is None) == (blocks is None):
            raise ValueError("give exactly one of piece_size= (tokens per block per axis) or blocks=")
        if piece_size is not None:
            blocks = tile_blocks(grid, piece_size, pad_tokens)
        super().__init__(dim, num_heads, grid=tuple(grid), blocks=blocks, **mhla_kwargs)
        self.piece_size, self.pad_tokens = piece_size, pad_tokens
        self._tile_layouts: dict[tuple[int, ...], BlockLayout] = {}  # blocks_for(grid) depends on grid only

    def blocks_for(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The block grid of this layer on the token grid `grid`."""
        return self.blocks if self.piece_size is None else tile_blocks(grid, self.piece_size, self.pad_tokens)

    def layout(self, grid: tuple[int, ...]) -> BlockLayout:
        """The BlockLayout of this layer's blocks on `grid` (cached per grid, shared between layers)."""
        grid = tuple(grid)
        layout = self._tile_layouts.get(grid)
        if layout is None:  # a dict lookup after the first call: nothing for torch.compile to trace
            layout = self._tile_layouts[grid] = cached_layout(grid, self.blocks_for(grid))
        return layout

    @torch.no_grad()
    def set_grid(self, grid: Sequence[int]) -> None:
        """Make `grid` the default grid; the mixing is resampled when the block grid changes."""
        grid, blocks = tuple(grid), self.blocks_for(grid)
        if blocks != self.blocks:
            w = resample_mixing(self.mixing, self.blocks, blocks)
            if isinstance(self.mixing, nn.Parameter):
                w = nn.Parameter(w, requires_grad=self.mixing.requires_grad)
            self.mixing, self.blocks = w, blocks  # the constraint hook reads `mixing` by name: still projected
        self.grid = grid

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None, _resampled: bool = False) -> torch.Tensor:
        """x: [B, N, C] in row-major order of `grid` (default: `self.grid`)."""
        grid = tuple(grid) if grid is not None else self.grid
        blocks = self.blocks_for(grid)
        if _resampled or blocks == self.blocks:
            return super().forward(x, grid)
        mixing = resample_mixing(self.mixing, self.blocks, blocks)  # MHLA.forward reads self.mixing: swap it in
        return functional_call(self, {"mixing": mixing}, (x, grid), {"_resampled": True})


class MHLAAttention(nn.Module):
    """The MHLA block's attention: LayerNorm (eps 1e-5, as the reference) then `TiledMHLA` over the patch grid.

    Args:
        dim, num_heads, qkv_bias, qk_norm, proj_drop: as timm's Attention (attn_drop is ignored: MHLA has no
            attention matrix to drop).
        grid: the default patch grid. piece_size / blocks, pad_tokens, **mhla_kwargs: `TiledMHLA`'s.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, grid: tuple[int, int],
                 piece_size: int | None = None, blocks: tuple[int, int] | None = None, pad_tokens: bool = True,
                 **mhla_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mhla = TiledMHLA(dim, num_heads, grid=grid, piece_size=piece_size, blocks=blocks,
                              pad_tokens=pad_tokens, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=proj_drop,
                              **mhla_kwargs)

    def set_grid(self, grid: Sequence[int]) -> None:
        """Make `grid` the default patch grid (`TiledMHLA.set_grid`)."""
        self.mhla.set_grid(grid)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.mhla(self.norm(x), grid)


class SoftmaxAttention(SoftmaxBaseline):
    """`mhla_core.softmax_baseline.SoftmaxBaseline` (softmax attention with MHLA's projections, names and
    initial weights) with the classification defaults: a required patch grid and LePE 5x5."""

    def __init__(self, dim: int, num_heads: int, *, grid: tuple[int, int], qkv_bias: bool = False,
                 qk_norm: bool = False, lepe_kernel: int | None = 5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, grid=grid, qkv_bias=qkv_bias, qk_norm=qk_norm, lepe_kernel=lepe_kernel,
                         attn_drop=attn_drop, proj_drop=proj_drop)


class SoftmaxBlockAttention(nn.Module):
    """The `MHLAAttention` block with `SoftmaxAttention` in place of MHLA.

    The inner layer keeps the attribute name `mhla` so that parameter names are the MHLA model's.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, grid: tuple[int, int],
                 lepe_kernel: int | None = 5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mhla = SoftmaxAttention(dim, num_heads, grid=grid, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                     lepe_kernel=lepe_kernel, attn_drop=attn_drop, proj_drop=proj_drop)

    def set_grid(self, grid: Sequence[int]) -> None:
        """Make `grid` the default patch grid."""
        self.mhla.set_grid(grid)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.mhla(self.norm(x), grid)


class GridBlock(nn.Module):
    """timm's pre-norm ViT block (the submodules, names and order of `timm.models.vision_transformer.Block`, so
    state dicts and initial weights are the same) whose attention takes the patch grid: `forward(x, grid)`.
    As timm's own models with their own attention do (eva's EvaBlock), the block is the model's own.

    Args: as timm's Block; `attn_layer` is built as `attn_layer(dim, num_heads, qkv_bias=, qk_norm=,
    attn_drop=, proj_drop=, **attn_kwargs)`. scale_attn_norm and proj_bias=False are not supported.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: float | None = None, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = LayerNorm, mlp_layer: type[nn.Module] = Mlp,
                 attn_layer: type[nn.Module] = MHLAAttention, attn_kwargs: dict | None = None, depth: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if scale_attn_norm or not proj_bias:
            raise ValueError("scale_attn_norm=True and proj_bias=False are not supported by the MHLA block's "
                             "attention; leave them at False and True")
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                               proj_drop=proj_drop, **(attn_kwargs or {}))
        if device is not None or dtype is not None:
            self.attn.to(**{k: v for k, v in dd.items() if v is not None})
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [B, N, C] in row-major order of the patch grid `grid` (default: the attention's own)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
