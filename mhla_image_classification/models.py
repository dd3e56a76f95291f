"""timm-registered DeiT-style ViTs with MHLA, linear or softmax attention in one block (no class token,
average pooling).

    import mhla_image_classification, timm
    model = timm.create_model("mhla_deit_tiny_patch16_224")             # the paper's DeiT-T row
    model = timm.create_model("mhla_deit_tiny_patch16_224", pad_image=False, normalizer="exact")
    model = timm.create_model("softmax_block_deit_tiny_patch16_224")    # the same block, softmax attention

The attention is `mhla_core.MHLA` behind the block's norm1 and the reference's own affine LayerNorm,
with q/k RMSNorm over the full width, LePE (5x5 depthwise conv of v) and a mixing matrix over
`piece_size` x `piece_size`-token blocks, clamped into [0, 1] after every optimiser step.
At 224 px the paper zero-pads every image, centred, to 256 px (a 16x16 patch grid, 16 blocks);
`pad_image=False` keeps the 14x14 grid and pads in token space instead (BlockLayout padding).

`linear_deit_*` is the same block with one block (M = 1). `softmax_block_deit_*` is the same block with
softmax attention (`F.scaled_dot_product_attention`) in place of the MHLA op: the same LayerNorm, qkv,
q/k RMSNorm, LePE, projection, pooling and image padding, and the same parameter names (less `mixing`),
so it isolates the attention. The paper's softmax baseline is timm's own `deit_*` (class token, no LePE).
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


class SoftmaxAttention(nn.Module):
    """Softmax attention with the projections of `mhla_core.MHLA` over a 2D grid: qkv, q/k RMSNorm over the full
    width, `F.scaled_dot_product_attention` (scale head_dim ** -0.5), LePE of v, output projection.

    Submodules are created in MHLA's order under MHLA's names, so a state dict moves between the two
    (MHLA's `mixing` aside) and one seed gives both the same initial weights.
    """

    def __init__(self, dim: int, num_heads: int, *, grid: tuple[int, int], qkv_bias: bool = False,
                 qk_norm: bool = False, lepe_kernel: int | None = 5, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if lepe_kernel is not None and (not isinstance(lepe_kernel, int) or lepe_kernel < 1 or lepe_kernel % 2 == 0):
            raise ValueError(f"lepe_kernel must be an odd int >= 1 or None, got {lepe_kernel!r}")
        self.grid = tuple(grid)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim) if qk_norm else nn.Identity()
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] in row-major order of the grid."""
        B, N, C = x.shape
        if N != math.prod(self.grid) or C != self.dim:
            raise ValueError(f"x is {tuple(x.shape)}, expected [B, {math.prod(self.grid)}, {self.dim}] for grid "
                             f"{self.grid}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, N, C)
        if self.lepe is not None:
            o = o + self.lepe(v.transpose(1, 2).reshape(B, C, *self.grid)).reshape(B, C, N).transpose(1, 2)
        return self.proj_drop(self.proj(o))


class SoftmaxBlockAttention(nn.Module):
    """timm `attn_layer`: the `MHLAAttention` block with `SoftmaxAttention` in place of MHLA.

    The inner layer keeps the attribute name `mhla` so that parameter names are the MHLA model's.
    Built by `softmax_block_attention(grid, lepe_kernel)`.
    """

    grid: tuple[int, int] = (14, 14)
    lepe_kernel: int | None = 5

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, **_: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mhla = SoftmaxAttention(dim, num_heads, grid=self.grid, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                     lepe_kernel=self.lepe_kernel, attn_drop=attn_drop, proj_drop=proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self.mhla(self.norm(x))


def softmax_block_attention(grid: tuple[int, int], lepe_kernel: int | None = 5) -> type[SoftmaxBlockAttention]:
    """A `SoftmaxBlockAttention` class bound to a patch grid and LePE kernel."""
    return type("SoftmaxBlockAttention", (SoftmaxBlockAttention,), {"grid": tuple(grid), "lepe_kernel": lepe_kernel})


ATTENTIONS = ("mhla", "linear", "softmax")
MHLA_DEFAULTS = dict(piece_size=4, transform="linear", exp_sigma=3.0, local_thres=1.5, normalizer="reference",
                     pad_tokens=True, mixing_constraint="clamp01")  # settings of the MHLA op only


def _create(variant: str, size: str, res: int, *, attention: str = "mhla", pretrained: bool = False,
            pad_image: bool | None = None, lepe_kernel: int | None = 5, **kwargs) -> VisionTransformer:
    """One DeiT-style model; `attention` is "mhla", "linear" (MHLA with one block) or "softmax" (the same block
    with softmax attention, which takes none of `MHLA_DEFAULTS`)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    given = {k: kwargs.pop(k) for k in MHLA_DEFAULTS if k in kwargs}
    if attention == "softmax" and given:
        raise ValueError(f"{variant} has softmax attention and takes no MHLA setting; drop {', '.join(given)} "
                         f"(it takes pad_image and lepe_kernel)")
    opts = {**MHLA_DEFAULTS, **given}
    piece_size, pad_tokens = opts.pop("piece_size"), opts.pop("pad_tokens")
    dim, heads = SIZES[size]
    img_size = kwargs.pop("img_size", res)
    patch = kwargs.pop("patch_size", 16)
    if pad_image is None:  # the softmax block pads as the MHLA block does: both see the same grid
        pad_image = img_size in PAPER_PAD and patch == 16 and attention != "linear"
    embed_size = PAPER_PAD.get(img_size, img_size) if pad_image else img_size
    if embed_size % patch:
        raise ValueError(f"img_size {embed_size} is not a multiple of patch_size {patch}")
    side = embed_size // patch
    if attention == "softmax":
        attn = softmax_block_attention((side, side), lepe_kernel=lepe_kernel)
    else:
        if attention == "linear":
            blocks = (1, 1)
        else:
            if side % piece_size and (pad_image or not pad_tokens):
                raise ValueError(f"a {side}x{side} patch grid is not divisible by piece_size={piece_size} and "
                                 f"token padding is off; use pad_tokens=True, pad_image=False or a piece_size "
                                 f"dividing {side}")
            blocks = (math.ceil(side / piece_size),) * 2
        attn = mhla_attention((side, side), blocks=blocks, lepe_kernel=lepe_kernel, **opts)
    args = dict(img_size=embed_size, patch_size=patch, embed_dim=dim, depth=12, num_heads=heads, qkv_bias=False,
                qk_norm=True, class_token=False, global_pool="avg", attn_layer=attn,
                embed_layer=CenterPadPatchEmbed if embed_size != img_size else PatchEmbed)
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **args)


def _cfg(img_size: int) -> dict:
    return dict(url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=0.875 if img_size == 224 else 1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")


RESOLUTIONS = (224, 384, 512)
MHLA_NAMES = [f"mhla_deit_{s}_patch16_{r}" for s in SIZES for r in RESOLUTIONS]
LINEAR_NAMES = [f"linear_deit_{s}_patch16_224" for s in SIZES]
SOFTMAX_BLOCK_NAMES = [f"softmax_block_deit_{s}_patch16_{r}" for s in SIZES for r in RESOLUTIONS]
MODEL_NAMES = MHLA_NAMES + LINEAR_NAMES + SOFTMAX_BLOCK_NAMES
default_cfgs = generate_default_cfgs({name: _cfg(int(name.rsplit("_", 1)[1])) for name in MODEL_NAMES})


def _register(name: str) -> None:
    kind, _, size, _, res = name.split("_")

    def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _create(name, size, int(res), attention=kind, pretrained=pretrained, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{'Linear-attention' if kind == 'linear' else 'MHLA'} DeiT-{size} at {res} px."
    fn.__module__ = __name__
    globals()[name] = register_model(fn)


for _name in MHLA_NAMES + LINEAR_NAMES:
    _register(_name)


# The same-block softmax baselines: each MHLA model's block with softmax attention.

def _softmax_block(name: str, pretrained: bool, kwargs: dict) -> VisionTransformer:
    _, _, _, size, _, res = name.split("_")
    return _create(name, size, int(res), attention="softmax", pretrained=pretrained, **kwargs)


@register_model
def softmax_block_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _softmax_block("softmax_block_deit_tiny_patch16_224", pretrained, kwargs)


@register_model
def softmax_block_deit_tiny_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_384 (a 24x24 grid)."""
    return _softmax_block("softmax_block_deit_tiny_patch16_384", pretrained, kwargs)


@register_model
def softmax_block_deit_tiny_patch16_512(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_512 (a 32x32 grid)."""
    return _softmax_block("softmax_block_deit_tiny_patch16_512", pretrained, kwargs)


@register_model
def softmax_block_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _softmax_block("softmax_block_deit_small_patch16_224", pretrained, kwargs)


@register_model
def softmax_block_deit_small_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_384 (a 24x24 grid)."""
    return _softmax_block("softmax_block_deit_small_patch16_384", pretrained, kwargs)


@register_model
def softmax_block_deit_small_patch16_512(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_512 (a 32x32 grid)."""
    return _softmax_block("softmax_block_deit_small_patch16_512", pretrained, kwargs)


@register_model
def softmax_block_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _softmax_block("softmax_block_deit_base_patch16_224", pretrained, kwargs)


@register_model
def softmax_block_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_384 (a 24x24 grid)."""
    return _softmax_block("softmax_block_deit_base_patch16_384", pretrained, kwargs)


@register_model
def softmax_block_deit_base_patch16_512(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_512 (a 32x32 grid)."""
    return _softmax_block("softmax_block_deit_base_patch16_512", pretrained, kwargs)
