"""MHLAConfig: GLA's field names (fla) plus the causal MHLA settings."""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig


class MHLAConfig(PretrainedConfig):
    """Configuration of an MHLA language model (fla GLA layout with the attention replaced by MHLA).

    Beyond GLA's fields: `chunk_size` (tokens per chunk, 64), `max_chunks` (size L of the mixing
    matrix, 32; the longest input is `chunk_size * max_chunks`), `mixing_clamp` (bounds applied by
    `constrain_mixing()`), `rope_theta` (rotary base).
    """

    model_type = "mhla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 1024,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        feature_map: str = "relu",
        hidden_act: str = "swish",
        elementwise_affine: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        max_chunks: int = 32,
        mixing_clamp: tuple[float, float] | list[float] = (1e-5, 1.0),
        rope_theta: float = 10000.0,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        vocab_size: int = 32000,
        **kwargs: Any,
    ) -> None:
        if feature_map != "relu":
            raise ValueError(f"MHLA uses feature_map 'relu', got {feature_map!r}")
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.feature_map = feature_map
        self.hidden_act = hidden_act
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.mixing_clamp = list(mixing_clamp)
        self.rope_theta = rope_theta
        self.max_position_embeddings = chunk_size * max_chunks
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = False
        self.use_l2warp = False
        self.attnres_block_size = None
        self.vocab_size = vocab_size
        kwargs.pop("max_position_embeddings", None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
