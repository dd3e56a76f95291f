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

Every model is a `vit.MHLAVisionTransformer` (layers in `layers.py`): features_only, forward_intermediates,
set_input_size, dynamic_img_size, img_size pairs, pretrained weights of another resolution (through
`checkpoint_filter_fn`), save_for_hf / "local-dir:" and pickling work as timm users expect (docs/timm.md).
"""

from __future__ import annotations

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from mhla_image_classification.layers import (
    PAPER_PAD,
    CenterPadPatchEmbed,
    GridBlock,
    MHLAAttention,
    SoftmaxAttention,
    SoftmaxBlockAttention,
    TiledMHLA,
    resample_mixing,
)
from mhla_image_classification.vit import ATTENTIONS, MHLAVisionTransformer, checkpoint_filter_fn

SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # embed dim, heads; depth 12, patch 16
MHLA_DEFAULTS = dict(piece_size=4, transform="linear", exp_sigma=3.0, local_thres=1.5, normalizer="reference",
                     pad_tokens=True, mixing_constraint="clamp01")  # settings of the MHLA op only
KINDS = {"mhla": "mhla", "linear": "linear", "softmax_block": "softmax"}  # name prefix -> attention


def _create(variant: str, pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """One registered model: `variant` names the attention, size and resolution; kwargs are
    `MHLAVisionTransformer`'s and timm's (softmax attention takes none of `MHLA_DEFAULTS`)."""
    prefix, size, res = variant.rsplit("_deit_", 1)[0], variant.split("_")[-3], int(variant.rsplit("_", 1)[1])
    attention = KINDS[prefix]
    if "attention" in kwargs:
        raise ValueError(f"attention is set by the model name ({variant}: {attention!r}); choose another name")
    given = [k for k in MHLA_DEFAULTS if k in kwargs]
    if attention == "softmax" and given:
        raise ValueError(f"{variant} has softmax attention and takes no MHLA setting; drop {', '.join(given)} "
                         f"(it takes pad_image and lepe_kernel)")
    dim, heads = SIZES[size]
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last three blocks, as timm's ViTs
    args = dict(img_size=res, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, attention=attention)
    args.update(kwargs)
    return build_model_with_cfg(MHLAVisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


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


def is_package_model(name: str) -> bool:
    """Whether timm's registry has `name` (a pretrained tag after "." allowed) as a model registered here."""
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ == __name__


def attention_of(name: str) -> str | None:
    """The attention ("mhla", "linear" or "softmax") of a model registered here; None for any other model."""
    if not is_package_model(name):
        return None
    return KINDS[timm.models.get_arch_name(name).rsplit("_deit_", 1)[0]]


# MHLA: the paper's models (blocks of 4x4 tokens).

@register_model
def mhla_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-tiny at 224 px (224 px padded to 256: a 16x16 grid, 4x4 blocks)."""
    return _create("mhla_deit_tiny_patch16_224", pretrained, **kwargs)

@register_model
def mhla_deit_tiny_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-tiny at 384 px (a 24x24 grid, 6x6 blocks)."""
    return _create("mhla_deit_tiny_patch16_384", pretrained, **kwargs)

@register_model
def mhla_deit_tiny_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-tiny at 512 px (a 32x32 grid, 8x8 blocks)."""
    return _create("mhla_deit_tiny_patch16_512", pretrained, **kwargs)

@register_model
def mhla_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-small at 224 px (224 px padded to 256: a 16x16 grid, 4x4 blocks)."""
    return _create("mhla_deit_small_patch16_224", pretrained, **kwargs)

@register_model
def mhla_deit_small_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-small at 384 px (a 24x24 grid, 6x6 blocks)."""
    return _create("mhla_deit_small_patch16_384", pretrained, **kwargs)

@register_model
def mhla_deit_small_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-small at 512 px (a 32x32 grid, 8x8 blocks)."""
    return _create("mhla_deit_small_patch16_512", pretrained, **kwargs)

@register_model
def mhla_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-base at 224 px (224 px padded to 256: a 16x16 grid, 4x4 blocks)."""
    return _create("mhla_deit_base_patch16_224", pretrained, **kwargs)

@register_model
def mhla_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-base at 384 px (a 24x24 grid, 6x6 blocks)."""
    return _create("mhla_deit_base_patch16_384", pretrained, **kwargs)

@register_model
def mhla_deit_base_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """MHLA DeiT-base at 512 px (a 32x32 grid, 8x8 blocks)."""
    return _create("mhla_deit_base_patch16_512", pretrained, **kwargs)


# Linear attention: the MHLA block with one block (M = 1), no image padding (a 14x14 grid).

@register_model
def linear_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Linear-attention DeiT-tiny at 224 px (the MHLA block with one block, a 14x14 grid)."""
    return _create("linear_deit_tiny_patch16_224", pretrained, **kwargs)

@register_model
def linear_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Linear-attention DeiT-small at 224 px (the MHLA block with one block, a 14x14 grid)."""
    return _create("linear_deit_small_patch16_224", pretrained, **kwargs)

@register_model
def linear_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Linear-attention DeiT-base at 224 px (the MHLA block with one block, a 14x14 grid)."""
    return _create("linear_deit_base_patch16_224", pretrained, **kwargs)


# The same-block softmax baselines: each MHLA model's block with softmax attention.

@register_model
def softmax_block_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _create("softmax_block_deit_tiny_patch16_224", pretrained, **kwargs)

@register_model
def softmax_block_deit_tiny_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_384 (a 24x24 grid)."""
    return _create("softmax_block_deit_tiny_patch16_384", pretrained, **kwargs)

@register_model
def softmax_block_deit_tiny_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_tiny_patch16_512 (a 32x32 grid)."""
    return _create("softmax_block_deit_tiny_patch16_512", pretrained, **kwargs)

@register_model
def softmax_block_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _create("softmax_block_deit_small_patch16_224", pretrained, **kwargs)

@register_model
def softmax_block_deit_small_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_384 (a 24x24 grid)."""
    return _create("softmax_block_deit_small_patch16_384", pretrained, **kwargs)

@register_model
def softmax_block_deit_small_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_small_patch16_512 (a 32x32 grid)."""
    return _create("softmax_block_deit_small_patch16_512", pretrained, **kwargs)

@register_model
def softmax_block_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_224 (224 px padded to 256, a 16x16 grid)."""
    return _create("softmax_block_deit_base_patch16_224", pretrained, **kwargs)

@register_model
def softmax_block_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_384 (a 24x24 grid)."""
    return _create("softmax_block_deit_base_patch16_384", pretrained, **kwargs)

@register_model
def softmax_block_deit_base_patch16_512(pretrained: bool = False, **kwargs) -> MHLAVisionTransformer:
    """Softmax attention in the block of mhla_deit_base_patch16_512 (a 32x32 grid)."""
    return _create("softmax_block_deit_base_patch16_512", pretrained, **kwargs)


__all__ = ["MODEL_NAMES", "MHLA_NAMES", "LINEAR_NAMES", "SOFTMAX_BLOCK_NAMES", "MHLA_DEFAULTS", "ATTENTIONS",
           "PAPER_PAD", "MHLAVisionTransformer", "checkpoint_filter_fn", "resample_mixing", "is_package_model",
           "attention_of", "CenterPadPatchEmbed", "GridBlock", "MHLAAttention", "SoftmaxAttention",
           "SoftmaxBlockAttention", "TiledMHLA"]
