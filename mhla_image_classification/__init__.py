"""MHLA image classification: timm-registered DeiT-style ViTs with MHLA or linear attention, and compact
train / eval scripts on timm's data, mixup, optimiser, scheduler and EMA APIs.

Importing the package registers `mhla_deit_{tiny,small,base}_patch16_{224,384,512}`,
`linear_deit_{tiny,small,base}_patch16_224` and the same-block softmax baselines
`softmax_block_deit_{tiny,small,base}_patch16_{224,384,512}` with timm."""

from mhla_core import constrain_mixing
from mhla_image_classification.models import MODEL_NAMES

__all__ = ["MODEL_NAMES", "constrain_mixing"]
