"""Token-mixing layers of the MHLA language model."""

from mhla_nlp.layers.mhla import MHLAAttention

__all__ = ["MHLAAttention"]
