"""mhla_core: the MHLA operator (functional ops, Triton kernels), block layouts, mixing and layers."""

from mhla_core.layers import MHLA, constrain_mixing
from mhla_core.layout import BlockLayout
from mhla_core.mixing import block_distance_mixing, causal_mixing_init
from mhla_core.ops import MHLAState, NoncausalConfig, StateConfig, chunk_mhla, fused_recurrent_mhla, mhla

__version__ = "0.1.0"

__all__ = [
    "mhla",
    "NoncausalConfig",
    "StateConfig",
    "chunk_mhla",
    "fused_recurrent_mhla",
    "MHLAState",
    "BlockLayout",
    "block_distance_mixing",
    "causal_mixing_init",
    "MHLA",
    "constrain_mixing",
]
