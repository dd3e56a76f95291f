"""Causal MHLA attention layer for language modelling (fla-style, on `mhla_core.chunk_mhla`).

q, k = ReLU(q_proj x), ReLU(k_proj x), rotated (rotary, base 1e4); v = v_proj x; the causal
chunked op (no normaliser, scale Dk^-0.5); a per-head RMSNorm gated by swish(g_proj x); o_proj.
Parameter names follow the authors' checkpoints (`q_proj`, ..., `mixing_matrix`, `g_norm_swish_gate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from fla.layers.utils import repad_hidden_states, unpad_hidden_states
from fla.ops.utils.index import prepare_position_ids
from torch import nn

from mhla_core import MHLAState, causal_mixing_init, chunk_mhla, fused_recurrent_mhla
from mhla_core.constraint import register_constrained
from mhla_core.ops.causal import StaticMHLAState, fused_recurrent_mhla_static
from mhla_core.ops.causal.checks import check_cu_seqlens
from mhla_core.ops.utils import host_to_device
from mhla_nlp.modules import FusedRMSNormGated, Rotary


def _mixing_pre_hook(module: MHLAAttention):
    def hook(state_dict, prefix, *args):
        key = prefix + "mixing_matrix"
        w = state_dict.get(key)
        if w is not None and w.dim() > 2:
            state_dict[key] = reshape_reference_mixing(w)

    return hook


def reshape_reference_mixing(w: torch.Tensor) -> torch.Tensor:
    """The authors store the mixing as [L, L, 1, 1, 1, 1]; return it as [L, L]."""
    if w.dim() < 2 or w.shape[0] != w.shape[1] or w[0, 0].numel() != 1:
        raise ValueError(f"mixing_matrix of shape {tuple(w.shape)} is not [L, L] or [L, L, 1, ...]")
    return w.reshape(w.shape[0], w.shape[1])


@dataclass
class LayerInputs:
    """The tokens a layer runs the op on, from `MHLAAttention._prepare_inputs`.

    x: [B, T, D], or [1, N, D] packed documents; positions: their rotary positions, [B, T] or [1, N];
    cu_seqlens: the document bounds of packed x, else None; indices: where the packed tokens of a padded
    batch sit in its flattened [B * T] tokens (for fla's repad), else None.
    """

    x: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    indices: torch.Tensor | None = None


class MHLAAttention(nn.Module):
    """Causal multi-head linear attention with chunk mixing (one `mixing_matrix` [L, L] per layer).

    Handles full batches, padded batches (attention_mask -> packed documents), packed input
    (`cu_seqlens`, batch 1) and cached decoding (prefill with `chunk_mhla`, then
    `fused_recurrent_mhla` per token from an `MHLAState` with per-sequence offsets). With a static cache
    (`mhla_nlp.cache.MHLAStaticCache`) the layer state is a `StaticMHLAState`: a prefill is loaded into it
    and a one-token step updates it in place with `fused_recurrent_mhla_static`, offsets on the device.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_heads: int = 4,
        norm_eps: float = 1e-6,
        elementwise_affine: bool = True,
        chunk_size: int = 64,
        max_chunks: int = 32,
        mixing_clamp: tuple[float, float] = (1e-5, 1.0),
        rope_theta: float = 10000.0,
        layer_idx: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(
                f"key dim {self.key_dim} and value dim {self.value_dim} must divide by num_heads {num_heads}"
            )
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.chunk_size, self.max_chunks = int(chunk_size), int(max_chunks)
        self.mixing_clamp = (float(mixing_clamp[0]), float(mixing_clamp[1]))
        self.backend = backend
        self.decode_backend = "torch"  # fused_recurrent_mhla's backend for cached one-token steps
        self.static_decode_backend = "auto"  # fused_recurrent_mhla_static's, with a static cache (Triton on CUDA)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.mixing_matrix = nn.Parameter(causal_mixing_init(self.max_chunks))
        register_constrained(self, "mixing_matrix")  # clamp + lower triangle after every optimiser step
        self.g_norm_swish_gate = FusedRMSNormGated(self.head_v_dim, elementwise_affine=elementwise_affine, eps=norm_eps)
        self.rotary = Rotary(self.head_k_dim, base=rope_theta)
        self._register_load_state_dict_pre_hook(_mixing_pre_hook(self))

    @property
    def max_length(self) -> int:
        """The longest sequence the mixing covers: max_chunks * chunk_size."""
        return self.max_chunks * self.chunk_size

    @torch.no_grad()
    def reset_mixing(self) -> None:
        """Re-initialise the mixing to the reference `tril / (i + 1)`."""
        self.mixing_matrix.copy_(causal_mixing_init(self.max_chunks))

    @torch.no_grad()
    def constrain_mixing(self) -> None:
        """Clamp the mixing into `mixing_clamp` and zero it above the diagonal (after optimiser steps)."""
        lo, hi = self.mixing_clamp
        self.mixing_matrix.clamp_(lo, hi).tril_()

    def _empty_state(self, batch: int, v: torch.Tensor) -> MHLAState:
        return MHLAState.zeros(
            batch, self.num_heads, self.max_chunks, self.head_k_dim, self.head_v_dim, self.chunk_size, device=v.device
        )

    def _check_length(self, end: int) -> None:
        if end > self.max_length:
            raise ValueError(
                f"a sequence reaches {end} tokens but the model covers max_chunks * chunk_size = "
                f"{self.max_chunks} * {self.chunk_size} = {self.max_length}; raise `max_chunks` in the config "
                f"to at least {-(-end // self.chunk_size)} (the mixing matrix is max_chunks x max_chunks)"
            )

    def _prepare_inputs(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        state: MHLAState | None,
    ) -> LayerInputs:
        """The four input modes as the tokens, positions and documents the op runs on.

        dense: [B, T], one sequence per row (no mask, or a mask without padding among the new tokens);
        padded: an attention_mask with padding, unpadded into packed documents with fla's helpers
            (a row of only padding is an empty document);
        packed: `cu_seqlens` document bounds over a batch of 1;
        cached: a state from the cache, each row continuing at its own offset.
        """
        B, T, _ = hidden_states.shape
        dev = hidden_states.device
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [B, T] (1 = token, 0 = padding), got {tuple(attention_mask.shape)}"
            )
        mask = None if attention_mask is None else attention_mask[:, -T:]
        padded = mask is not None and not bool(mask.all())
        if state is not None:
            if cu_seqlens is not None or padded:
                raise ValueError(
                    "with a cache, new tokens must all be real tokens of one sequence per row: "
                    "left padding before the prefill is supported, padding or cu_seqlens after it is not"
                )
            if isinstance(state, StaticMHLAState):  # offsets on the device; the length bound is kept on the host
                if B > state.batch_size:
                    raise ValueError(f"the static cache holds {state.batch_size} sequences, the input has {B}")
                self._check_length(state.max_offset + T)
                return LayerInputs(hidden_states, state.offsets[:B, None] + torch.arange(T, device=dev))
            self._check_length(max(state.offsets) + T)
            positions = host_to_device(torch.tensor([[off + t for t in range(T)] for off in state.offsets]), dev)
            return LayerInputs(hidden_states, positions)
        if not padded and cu_seqlens is None:
            self._check_length(T)
            return LayerInputs(hidden_states, torch.arange(T, device=dev).expand(B, T))

        x, indices = hidden_states, None
        if padded:
            if cu_seqlens is not None:
                raise ValueError("pass either an attention_mask with padding or cu_seqlens, not both")
            if bool(((F.pad(mask.int(), (1, 0)).diff(dim=1) == 1).sum(1) > 1).any()):
                raise ValueError("the tokens of each row of attention_mask must be contiguous (left or right padding)")
            x, indices, cu_seqlens = unpad_hidden_states(hidden_states, None, attention_mask, T)
        elif B != 1:
            raise ValueError(f"cu_seqlens needs packed input of batch 1, got batch {B}")
        cu_seqlens = cu_seqlens.to(dev)
        bounds = check_cu_seqlens(cu_seqlens, 1, x.shape[1])
        self._check_length(max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
        return LayerInputs(x, prepare_position_ids(cu_seqlens)[None], cu_seqlens, indices)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Any]:
        """hidden_states [B, T, D]; attention_mask [B, T_past + T] (1 = token, 0 = padding, contiguous per row)."""
        B, T, _ = hidden_states.shape
        state: MHLAState | StaticMHLAState | None = None
        if past_key_values is not None and len(past_key_values) > self.layer_idx:
            state = past_key_values[self.layer_idx]["recurrent_state"]
        static = state if isinstance(state, StaticMHLAState) else None
        if static is not None and (static.empty or T > 1):  # a prefill (or continuation) runs as with a dynamic cache
            state = None if static.empty else static.to_state(self.max_chunks, B)  # to_state syncs once
        inputs = self._prepare_inputs(hidden_states, attention_mask, cu_seqlens, state)
        x = inputs.x

        H = self.num_heads
        q = F.relu(self.q_proj(x)).unflatten(-1, (H, self.head_k_dim))
        k = F.relu(self.k_proj(x)).unflatten(-1, (H, self.head_k_dim))
        v = self.v_proj(x).unflatten(-1, (H, self.head_v_dim))
        cos, sin = self.rotary.cos_sin(inputs.positions)  # once for q and k
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)

        want_state = bool(use_cache) and past_key_values is not None
        common = dict(chunk_size=self.chunk_size, initial_state=state, output_final_state=want_state)
        if static is not None and state is static:  # in place, no host sync: a CUDA graph can capture it
            o = fused_recurrent_mhla_static(q, k, v, self.mixing_matrix, static, backend=self.static_decode_backend)
            new_state = static
        elif state is not None and T == 1:
            o, new_state = fused_recurrent_mhla(q, k, v, self.mixing_matrix, backend=self.decode_backend, **common)
        elif x.shape[1] == 0:  # every row is padding
            o, new_state = v.new_zeros(*v.shape), (self._empty_state(B, v) if want_state else None)
        else:
            o, new_state = chunk_mhla(
                q, k, v, self.mixing_matrix, cu_seqlens=inputs.cu_seqlens, backend=self.backend, **common
            )

        g = self.g_proj(x).unflatten(-1, (H, self.head_v_dim))
        o = self.o_proj(self.g_norm_swish_gate(o, g).flatten(-2))
        o = repad_hidden_states(o, inputs.indices, B, T)
        if want_state:
            if static is not None and new_state is not static:
                static.load_(new_state, self.mixing_matrix)
                new_state = static
            past_key_values.update(recurrent_state=new_state, layer_idx=self.layer_idx, offset=T)
        return o, None, past_key_values
