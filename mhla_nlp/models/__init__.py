"""Models of mhla_nlp."""

from mhla_nlp.models.mhla import MHLAConfig, MHLAForCausalLM, MHLAModel

__all__ = ["MHLAConfig", "MHLAModel", "MHLAForCausalLM"]
