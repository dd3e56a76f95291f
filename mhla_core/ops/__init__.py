"""Functional MHLA ops: non-causal `mhla`, causal `chunk_mhla` and `fused_recurrent_mhla`."""

from mhla_core.ops.causal import MHLAState, chunk_mhla, fused_recurrent_mhla
from mhla_core.ops.noncausal import NoncausalConfig, StateConfig, mhla

__all__ = ["mhla", "NoncausalConfig", "StateConfig", "chunk_mhla", "fused_recurrent_mhla", "MHLAState"]
