"""The 2-layer MQAR language model of Zoology, with the sequence mixer under test swapped in.

Zoology (HazyResearch/zoology, `zoology/model.py` and the MQAR configs) trains every architecture
in the same frame: token embeddings (no position embeddings), pre-LayerNorm residual blocks with
no MLP, layer 0 a gated short convolution (`BaseConv`: causal depthwise conv of kernel 3 times a
linear projection, plus the input) and layer 1 the mixer being compared; a final LayerNorm and an
output head tied to the embeddings. The short convolution gives every token its predecessor, so
the one attention-like layer has to do only the recall. Mixers here:
- `mhla`: `mhla_nlp.layers.mhla.MHLAAttention` (ReLU features, rotary, gated RMSNorm) with
  `chunk_size` and one learned `max_chunks x max_chunks` mixing matrix;
- `linear`: the same layer with every mixing weight fixed to 1 (plain causal linear attention);
- `softmax`: causal multi-head softmax attention (SDPA), Zoology's `MHA` without dropout;
- `gla`: fla's `GatedLinearAttention` (CUDA only), as Zoology's `add_gla` (no short conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIXERS = ("mhla", "linear", "softmax", "gla")
MHLA_BACKENDS = ("auto", "torch", "triton")


class ShortConvMixer(nn.Module):
    """Zoology's BaseConv: y = causal_depthwise_conv(x) * proj(x) + x."""

    def __init__(self, d_model: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        T = x.shape[1]
        conv = self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)
        return conv * self.projection(x) + x


class SoftmaxMixer(nn.Module):
    """Causal multi-head softmax attention through `F.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} must divide by num_heads {num_heads}")
        self.num_heads = num_heads
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        B, T, D = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class FirstOutput(nn.Module):
    """Calls a layer that returns (output, ...) tuples (MHLAAttention, fla's GLA) and keeps the output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layer(x)[0]


def build_mixer(name: str, d_model: int, num_heads: int, seq_len: int, chunk_size: int) -> nn.Module:
    """The sequence mixer `name` (one of MIXERS) for width `d_model` and sequences up to `seq_len`."""
    if name in ("mhla", "linear"):
        from mhla_nlp.layers.mhla import MHLAAttention

        layer = MHLAAttention(hidden_size=d_model, num_heads=num_heads, chunk_size=chunk_size,
                              max_chunks=-(-seq_len // chunk_size), layer_idx=1)
        if name == "linear":
            with torch.no_grad():
                layer.mixing_matrix.copy_(torch.ones_like(layer.mixing_matrix).tril())
            layer.mixing_matrix.requires_grad_(False)
        return FirstOutput(layer)
    if name == "softmax":
        return SoftmaxMixer(d_model, num_heads)
    if name == "gla":
        from fla.layers import GatedLinearAttention

        return FirstOutput(GatedLinearAttention(mode="chunk", hidden_size=d_model, num_heads=num_heads,
                                                use_short_conv=False, layer_idx=1))
    raise ValueError(f"unknown mixer {name!r}; choose from {MIXERS}")


class MQARModel(nn.Module):
    """Zoology's LM frame: embeddings, [short conv, mixer] pre-norm residual blocks, tied head."""

    def __init__(self, mixer: nn.Module, vocab_size: int, d_model: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.mixers = nn.ModuleList([ShortConvMixer(d_model), mixer])
        self.norms = nn.ModuleList([nn.LayerNorm(d_model) for _ in self.mixers])
        self.norm_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.lm_head:
                nn.init.normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.lm_head.weight = self.embed.weight

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d_model] of token ids [B, T]."""
        x = self.embed(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.norm_f(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden(input_ids))

    @torch.no_grad()
    def constrain_mixing(self) -> None:
        """Apply the MHLA layers' mixing constraint (clamp, lower triangle) after an optimizer step."""
        for m in self.modules():
            if hasattr(m, "mixing_matrix") and m.mixing_matrix.requires_grad:
                m.constrain_mixing()


def build_mqar_model(name: str, d_model: int, seq_len: int, vocab_size: int, num_heads: int = 2,
                     chunk_size: int | None = None, mhla_backend: str = "torch") -> MQARModel:
    """Zoology's 2-layer MQAR model with mixer `name`; MHLA chunks default to seq_len / 16 (16 chunks)."""
    chunk = chunk_size or max(1, seq_len // 16)
    model = MQARModel(build_mixer(name, d_model, num_heads, seq_len, chunk), vocab_size, d_model)
    set_mhla_backend(model, mhla_backend)
    return model


def set_mhla_backend(model: nn.Module, backend: str) -> int:
    """Set `backend` on every MHLAAttention layer of `model`; returns how many layers were set."""
    from mhla_nlp.layers.mhla import MHLAAttention

    if backend not in MHLA_BACKENDS:
        raise ValueError(f"mhla backend must be one of {MHLA_BACKENDS}, got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, MHLAAttention)]
    for m in layers:
        m.backend = backend
    return len(layers)
