"""The MHLA language model: config, base model and causal LM."""

from mhla_nlp.models.mhla.configuration_mhla import MHLAConfig
from mhla_nlp.models.mhla.modeling_mhla import (
    MHLABlock,
    MHLAForCausalLM,
    MHLAModel,
    MHLAPreTrainedModel,
    convert_reference_state_dict,
)

__all__ = [
    "MHLAConfig",
    "MHLABlock",
    "MHLAModel",
    "MHLAForCausalLM",
    "MHLAPreTrainedModel",
    "convert_reference_state_dict",
]
