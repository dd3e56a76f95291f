"""The causal LMs the trainer builds: MHLA, plain linear attention (MHLA with frozen all-ones mixing), fla's
GLA and transformers' Llama (Transformer++), at the paper's 340M size unless overridden."""

from __future__ import annotations

import torch
import torch.nn as nn

MODELS = ("mhla", "linear", "gla", "transformer")
# the paper's 340M width and depth; --model-kwargs override any field
DEFAULTS = {
    "mhla": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1, hidden_ratio=4,
                 norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000, chunk_size=64, max_chunks=32),
    "gla": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1, hidden_ratio=4,
                norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000, attn_mode="chunk", use_short_conv=False,
                feature_map=None, use_output_gate=True, fuse_cross_entropy=True),
    "transformer": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                        intermediate_size=2816, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000,
                        max_position_embeddings=2048, rope_theta=10000.0, hidden_act="silu",
                        attention_bias=False, mlp_bias=False),
}


def build_model(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A fresh causal LM: `mhla`, `gla` (fla) or `transformer` (transformers' Llama with SDPA)."""
    kw = {**DEFAULTS["mhla" if name == "linear" else name], **(model_kwargs or {})}
    if name in ("mhla", "linear"):
        from mhla_nlp import MHLAConfig, MHLAForCausalLM

        model = MHLAForCausalLM(MHLAConfig(**kw))
        return freeze_linear_mixing(model) if name == "linear" else model
    if name == "gla":
        from fla.models import GLAConfig, GLAForCausalLM

        return GLAForCausalLM(GLAConfig(**kw))
    if name == "transformer":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa"))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def freeze_linear_mixing(model: nn.Module) -> nn.Module:
    """Plain causal linear attention from the MHLA layer: every mixing weight 1 (below the diagonal), frozen.

    Same chunking, kernels, features, rotary and output gate as MHLA; only the learned chunk mixing is gone.
    The saved model is an ordinary MHLA checkpoint (its mixing is the all-ones lower triangle).
    """
    from mhla_nlp.layers.mhla import MHLAAttention

    for m in model.modules():
        if isinstance(m, MHLAAttention):
            with torch.no_grad():
                m.mixing_matrix.copy_(torch.ones_like(m.mixing_matrix).tril())
            m.mixing_matrix.requires_grad_(False)
    return model


