"""timm-registered DeiT-style ViTs with MHLA or linear attention (no class token, average pooling).

    import mhla_image_classification, timm
    model = timm.create_model("mhla_deit_tiny_patch16_224")             # the paper's DeiT-T row
    model = timm.create_model("mhla_deit_tiny_patch16_224", pad_image=False, normalizer="exact")

The attention is `mhla_core.MHLA` behind the block's norm1 and the reference's own affine LayerNorm,
with q/k RMSNorm over the full width, LePE (5x5 depthwise conv of v) and a mixing matrix over
`piece_size` x `piece_size`-token blocks, clamped into [0, 1] after every optimiser step.
At 224 px the paper zero-pads every image, centred, to 256 px (a 16x16 patch grid, 16 blocks);
`pad_image=False` keeps the 14x14 grid and pads in token space instead (BlockLayout padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from mhla_core import MHLA

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # embed dim, heads; depth 12, patch 16
PAPER_PAD = {224: 256}  # image sizes the paper zero-pads to a grid its blocks divide


class CenterPadPatchEmbed(PatchEmbed):
    """PatchEmbed that first zero-pads a smaller image, centred, to the embed's `img_size`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        th, tw = self.img_size
        if H > th or W > tw:
            raise ValueError(f"image {H}x{W} is larger than the padded size {th}x{tw}")
        ph, pw = th - H, tw - W
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


class MHLAAttention(nn.Module):
    """timm `attn_layer`: LayerNorm (eps 1e-5, as the reference) then `mhla_core.MHLA` over the patch grid.

    Built by `mhla_attention(grid, **mhla_kwargs)`, which binds the grid and the MHLA settings.
    """

    grid: tuple[int, int] = (14, 14)
    mhla_kwargs: dict = {}

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = True,
                 proj_drop: float = 0.0, **_: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mhla = MHLA(dim, num_heads, grid=self.grid, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_drop=proj_drop,
                         **self.mhla_kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.mhla(self.norm(x))


def mhla_attention(grid: tuple[int, int], **mhla_kwargs) -> type[MHLAAttention]:
    """A `MHLAAttention` class bound to a patch grid and MHLA settings (timm instantiates attn_layer classes)."""
    return type("MHLAAttention", (MHLAAttention,), {"grid": tuple(grid), "mhla_kwargs": mhla_kwargs})


def _create(
    variant: str,
    size: str,
    res: int,
    *,
    linear: bool = False,
    pretrained: bool = False,
    piece_size: int = 4,
    transform: str = "linear",
    exp_sigma: float = 3.0,
    local_thres: float = 1.5,
    normalizer: str = "reference",
    pad_image: bool | None = None,
    pad_tokens: bool = True,
    lepe_kernel: int = 5,
    mixing_constraint: str = "clamp01",
    **kwargs,
) -> VisionTransformer:
    dim, heads = SIZES[size]
    img_size = kwargs.pop("img_size", res)
    patch = kwargs.pop("patch_size", 16)
    if pad_image is None:
        pad_image = img_size in PAPER_PAD and patch == 16 and not linear
    embed_size = PAPER_PAD.get(img_size, img_size) if pad_image else img_size
    if embed_size % patch:
        raise ValueError(f"img_size {embed_size} is not a multiple of patch_size {patch}")
    side = embed_size // patch
    if linear:
        blocks = (1, 1)
    else:
        if side % piece_size and (pad_image or not pad_tokens):
            raise ValueError(f"a {side}x{side} patch grid is not divisible by piece_size={piece_size} and token "
                             f"padding is off; use pad_tokens=True, pad_image=False or a piece_size dividing {side}")
        blocks = (math.ceil(side / piece_size),) * 2
    attn = mhla_attention((side, side), blocks=blocks, transform=transform, exp_sigma=exp_sigma,
                          local_thres=local_thres, normalizer=normalizer, lepe_kernel=lepe_kernel,
                          mixing_constraint=mixing_constraint)
    args = dict(img_size=embed_size, patch_size=patch, embed_dim=dim, depth=12, num_heads=heads, qkv_bias=False,
                qk_norm=True, class_token=False, global_pool="avg", attn_layer=attn,
                embed_layer=CenterPadPatchEmbed if embed_size != img_size else PatchEmbed)
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **args)


def _cfg(img_size: int) -> dict:
    return dict(url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=0.875 if img_size == 224 else 1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")


MODEL_NAMES = [f"mhla_deit_{s}_patch16_{r}" for s in SIZES for r in (224, 384, 512)] + [
    f"linear_deit_{s}_patch16_224" for s in SIZES]
default_cfgs = generate_default_cfgs({name: _cfg(int(name.rsplit("_", 1)[1])) for name in MODEL_NAMES})


def _register(name: str) -> None:
    kind, _, size, _, res = name.split("_")

    def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _create(name, size, int(res), linear=kind == "linear", pretrained=pretrained, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{'Linear-attention' if kind == 'linear' else 'MHLA'} DeiT-{size} at {res} px."
    fn.__module__ = __name__
    globals()[name] = register_model(fn)


for _name in MODEL_NAMES:
    _register(_name)
