"""MHLA image classification: timm-registered DeiT-style ViTs with MHLA or linear attention, and compact
train / eval scripts on timm's data, mixup, optimiser, scheduler and EMA APIs.

Importing the package registers `mhla_deit_{tiny,small,base}_patch16_{224,384,512}`,
`linear_deit_{tiny,small,base}_patch16_224` and the same-block softmax baselines
`softmax_block_deit_{tiny,small,base}_patch16_{224,384,512}` with timm (each an `MHLAVisionTransformer`:
features_only, forward_intermediates, set_input_size, dynamic_img_size, save_for_hf; docs/timm.md)."""

from mhla_core import constrain_mixing
from mhla_image_classification.models import MODEL_NAMES

__all__ = ["MODEL_NAMES", "constrain_mixing"]
