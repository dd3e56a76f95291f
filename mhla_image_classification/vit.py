"""`MHLAVisionTransformer`: timm's VisionTransformer with the MHLA block, and the `checkpoint_filter_fn` that
moves its weights to another token grid.

The model is timm's ViT (no class token, average pooling) whose blocks pass the patch grid to the attention, so
that every timm entry point that changes the grid works: `set_input_size`, `dynamic_img_size=True`,
`forward_intermediates` (and `features_only=True`, timm's FeatureGetterNet over it), pretrained weights of
another resolution. The grid rule, the same for all of them: the image is zero-padded as the paper does
(`pad_image`: 224 -> 256 per side), patchified, and MHLA's blocks are tiles of `piece_size` x `piece_size`
tokens, so the block count follows the grid (224 -> 4x4 blocks, 384 -> 6x6, 512 -> 8x8; linear attention keeps
one block). A grid of another block grid gets the mixing matrix resampled bilinearly over the block grid
(`layers.resample_mixing`) and the position embedding resampled as timm does (bicubic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed, resample_patch_embed, to_2tuple
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import VisionTransformer

from mhla_image_classification.layers import (
    CenterPadPatchEmbed,
    GridBlock,
    MHLAAttention,
    SoftmaxBlockAttention,
    TiledMHLA,
    padded_size,
    pair,
    resample_mixing,
    tile_blocks,
)

try:  # timm >= 1.0.2x records the size a model was moved to, for save_for_hf
    from timm.models._input import update_model_input_size
except ImportError:  # pragma: no cover
    def update_model_input_size(model: nn.Module, img_size, **model_args) -> None:
        pass

ATTENTIONS = ("mhla", "linear", "softmax")


def token_grid(img_size: Sequence[int], patch_size: Sequence[int], *, pad_image: bool, attention: str = "mhla",
               piece_size: int = 4, pad_tokens: bool = True) -> tuple[int, int]:
    """The patch grid of an `img_size` image (padded as the paper does when `pad_image`), checked against the
    MHLA blocks: a grid of a padded side must be divisible by `piece_size` (the padding is there to make it so),
    any other side too unless `pad_tokens` (zero tokens fill the last block)."""
    embed = padded_size(img_size) if pad_image else tuple(img_size)
    for e, p in zip(embed, patch_size):
        if e % p:
            raise ValueError(f"img_size {e} is not a multiple of patch_size {p}")
    grid = tuple(e // p for e, p in zip(embed, patch_size))
    if attention == "mhla":
        padded = [e != s for e, s in zip(embed, img_size)]
        if any(g % piece_size and (was_padded or not pad_tokens) for g, was_padded in zip(grid, padded)):
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid is not divisible by piece_size={piece_size} and "
                             f"token padding is off; use pad_tokens=True, pad_image=False or a piece_size dividing "
                             f"{' and '.join(str(g) for g in grid if g % piece_size)}")
    return grid


class MHLAVisionTransformer(VisionTransformer):
    """DeiT-style ViT with the MHLA block: no class token, average pooling, attention over the patch grid.

    Args:
        img_size: image size, an int or (height, width).
        patch_size: as timm's.
        attention: "mhla", "linear" (MHLA with one block) or "softmax" (the same block, softmax attention).
        pad_image: zero-pad images, centred, to the paper's sizes (224 -> 256 per side) before patchifying.
            Default: on for patch 16 and MHLA or softmax attention. Kept by set_input_size (a 224 image is padded
            again, a 384 one is not).
        piece_size: tokens per block per axis (MHLA). pad_tokens: let zero tokens fill the last block of a grid
            that piece_size does not divide (else an error).
        lepe_kernel: the LePE kernel (None: no LePE).
        transform, exp_sigma, local_thres, normalizer, mixing_constraint: the MHLA layer's (`mhla_core.MHLA`).
        **kwargs: timm's VisionTransformer (embed_dim, depth, num_heads, dynamic_img_size, drop_path_rate, ...).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16, *,
                 attention: str = "mhla", pad_image: bool | None = None, piece_size: int = 4,
                 pad_tokens: bool = True, lepe_kernel: int | None = 5, transform: str = "linear",
                 exp_sigma: float = 3.0, local_thres: float = 1.5, normalizer: str = "reference",
                 mixing_constraint: str = "clamp01", qkv_bias: bool = False, qk_norm: bool = True,
                 global_pool: str = "avg", **kwargs) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        for name, allowed in (("class_token", False), ("reg_tokens", 0), ("patch_drop_rate", 0.0)):
            if kwargs.pop(name, allowed) != allowed:
                raise ValueError(f"{name} must be {allowed} (MHLA attends over the full patch grid, prefix and "
                                 f"dropped tokens have no place in it)")
        for name in ("embed_layer", "block_fn", "attn_layer"):
            if name in kwargs:
                raise ValueError(f"{name} is set by MHLAVisionTransformer; choose the attention with attention=")
        image, patch = pair(img_size, "img_size"), to_2tuple(patch_size)
        if pad_image is None:
            pad_image = tuple(patch) == (16, 16) and attention != "linear"
        settings = dict(pad_image=pad_image, attention=attention, piece_size=piece_size, pad_tokens=pad_tokens)
        grid = token_grid(image, patch, **settings)
        if attention == "softmax":
            attn_layer, attn_kwargs = SoftmaxBlockAttention, dict(grid=grid, lepe_kernel=lepe_kernel)
        else:
            tiles = dict(piece_size=piece_size) if attention == "mhla" else dict(blocks=(1, 1))
            attn_layer = MHLAAttention
            attn_kwargs = dict(grid=grid, **tiles, pad_tokens=pad_tokens, lepe_kernel=lepe_kernel,
                               transform=transform, exp_sigma=exp_sigma, local_thres=local_thres,
                               normalizer=normalizer, mixing_constraint=mixing_constraint)
        super().__init__(img_size=image, patch_size=patch_size, class_token=False, global_pool=global_pool,
                         qkv_bias=qkv_bias, qk_norm=qk_norm,
                         embed_layer=CenterPadPatchEmbed if pad_image else PatchEmbed,
                         block_fn=partial(GridBlock, attn_kwargs=attn_kwargs), attn_layer=attn_layer, **kwargs)
        self.grid_settings = settings

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        """timm's `fix_init=True`: scale each block's output projections by 1 / sqrt(2 * (index + 1))."""
        for i, blk in enumerate(self.blocks):
            blk.attn.mhla.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    @property
    def image_size(self) -> tuple[int, int]:
        """The size of the images the model takes (before the paper's padding); nominal with dynamic_img_size."""
        return tuple(getattr(self.patch_embed, "image_size", self.patch_embed.img_size))

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """timm's `set_input_size`: a new image (and patch) size. The position embedding is resampled as timm does
        and every attention layer moves to the new patch grid (`set_grid`): with MHLA the blocks stay
        `piece_size` tokens wide, so the block count follows the grid and each mixing matrix is resampled
        bilinearly over the block grid (`resample_mixing`). The result is the model built at the new size with
        these weights passed through `checkpoint_filter_fn`."""
        image = pair(img_size, "img_size") if img_size is not None else self.image_size
        patch = to_2tuple(patch_size) if patch_size is not None else self.patch_embed.patch_size
        grid = token_grid(image, patch, **self.grid_settings)
        prev = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=image, patch_size=patch_size)
        if self.pos_embed is not None and grid != prev:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=prev,
                                                                 num_prefix_tokens=0, verbose=True),
                                          requires_grad=self.pos_embed.requires_grad)
        for blk in self.blocks:
            blk.attn.set_grid(grid)
        update_model_input_size(self, image, patch_size=patch_size)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch and position embedding: the tokens [B, N, C] and their grid."""
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return x, grid

    def _block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid)
        return blk(x, grid)

    @staticmethod
    def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported: MHLA attends over the whole patch grid")

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        """[B, 3, H, W] -> the normed tokens [B, N, C] of the whole patch grid (padding tokens included)."""
        self._no_mask(attn_mask, is_causal)
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = self._block(blk, x, grid)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict:
        """timm's `forward_intermediates` on any patch grid. The intermediates cover the tokens that hold image
        pixels: the tokens of the paper's padding are cropped, so a 224 px image gives 14x14 maps (NCHW) or 196
        tokens (NLC) although the blocks run on 16x16. The final features (not intermediates_only) are
        `forward_features`'s, every token. There are no prefix tokens (return_prefix_tokens changes nothing)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be one of ('NCHW', 'NLC'), got {output_fmt!r}")
        self._no_mask(attn_mask, is_causal)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        size = tuple(x.shape[-2:])
        x, grid = self._embed(x)
        if isinstance(self.patch_embed, CenterPadPatchEmbed):
            rows, cols = self.patch_embed.image_tokens(size)
        else:
            rows, cols = slice(None), slice(None)
        intermediates = []
        for i, blk in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            x = self._block(blk, x, grid)
            if i in take_indices:
                y = (self.norm(x) if norm else x).reshape(x.shape[0], *grid, -1)[:, rows, cols]
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y.flatten(1, 2))
        if output_dict:
            out = {"image_intermediates": intermediates}
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def _source_grid(tokens: int, model: MHLAVisionTransformer) -> tuple[int, int]:
    """The patch grid of a checkpoint's pos_embed of `tokens` tokens: square, or that of the size the model's
    source metadata names (`pretrained_model_args`, e.g. from a save_for_hf config)."""
    side = round(tokens ** 0.5)
    if side * side == tokens:
        return side, side
    source = getattr(model, "pretrained_model_args", {}).get("img_size")
    if source is not None:
        grid = token_grid(pair(source, "img_size"), model.patch_embed.patch_size, **model.grid_settings)
        if grid[0] * grid[1] == tokens:
            return grid
    raise ValueError(f"cannot tell the patch grid of a pos_embed of {tokens} tokens (not square, and the model's "
                     f"pretrained_model_args name no img_size of that many tokens); resize the checkpoint's model "
                     f"with set_input_size to {tuple(model.patch_embed.grid_size)} first")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MHLAVisionTransformer) -> dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn` for this package's models: a state dict of another patch grid (another
    resolution) adapted to `model`'s, the way `set_input_size` moves a model. `pos_embed` is resampled with timm's
    `resample_abs_pos_embed` (bicubic), every MHLA layer's `mixing` with `resample_mixing` (bilinear over the
    block grid, which has `piece_size`-token blocks on both grids), a patch kernel of another size with timm's
    `resample_patch_embed`. A checkpoint nested under "model" or "state_dict" is unwrapped; the rest passes."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    grid = tuple(model.patch_embed.grid_size)
    pos = state_dict.get("pos_embed")
    old_grid = grid if pos is None or model.pos_embed is None or pos.shape == model.pos_embed.shape \
        else _source_grid(pos.shape[1], model)
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and old_grid != grid:
            v = resample_abs_pos_embed(v, new_size=grid, old_size=old_grid, num_prefix_tokens=0, verbose=True)
        elif k == "patch_embed.proj.weight" and v.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            v = resample_patch_embed(v, model.patch_embed.proj.weight.shape[-2:], verbose=True)
        elif k.endswith(".mixing"):
            layer = model.get_submodule(k[: -len(".mixing")])
            if isinstance(layer, TiledMHLA) and v.shape != layer.mixing.shape:
                old = layer.blocks_for(old_grid)
                if v.shape[-1] != old[0] * old[1]:  # the checkpoint has blocks of another size: a square guess
                    side = round(v.shape[-1] ** 0.5)
                    old = (side, side)
                v = resample_mixing(v, old, layer.blocks)
        out[k] = v
    return out


__all__ = ["MHLAVisionTransformer", "checkpoint_filter_fn", "token_grid", "tile_blocks", "ATTENTIONS"]
