"""A static (preallocated) cache for MHLA language models, in the shape of transformers' `StaticCache`.

One `StaticMHLAState` per layer, allocated up front for `max_batch_size` sequences of up to `max_cache_len`
tokens, and updated in place: a one-token decode step reads the offsets on the device and syncs nothing,
so the whole model's step can be captured in a CUDA graph (`mhla_nlp.generation.static_greedy_generate`).
It is an fla `Cache` (the layers read `cache[layer_idx]["recurrent_state"]`), so `generate(cache=...)`,
`generate(cache_implementation="static")` and plain forwards take it as they take the dynamic cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fla.models.utils import Cache, FLALayer

from mhla_core.ops.causal import StaticMHLAState


class MHLAStaticLayer(FLALayer):
    """One layer's preallocated `StaticMHLAState`, as fla's layer-state dict (`recurrent_state`)."""

    def __init__(self, state: StaticMHLAState) -> None:
        super().__init__()
        self.state = {"recurrent_state": state, "attn_state": None, "conv_state": None, "ffn_state": None}
        self.device = state.device
        self.is_initialized = True

    @property
    def static_state(self) -> StaticMHLAState:
        return self.state["recurrent_state"]

    def update(self, *, recurrent_state: Any = None, offset: int = 1, **_: Any) -> dict[str, Any]:
        """Count `offset` more tokens; the state itself was updated in place by the layer."""
        if recurrent_state is not None and recurrent_state is not self.static_state:
            raise ValueError("a static cache layer keeps its own buffers: load a state with "
                             "StaticMHLAState.load_, do not replace it")
        self._seen_tokens += offset
        return self.state

    def get_max_length(self) -> int:
        return self.static_state.max_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: permute the rows in place (the buffers keep their addresses)."""
        st = self.static_state
        idx = beam_idx.to(st.device)
        for t in (st.chunk_states, st.partial, st.mixed, st.offsets):
            t[: idx.numel()].copy_(t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache has a fixed batch: allocate it with max_batch_size for the "
                                  "expanded batch (num_beams * num_return_sequences * batch)")

    def reset(self) -> None:
        self.static_state.reset_()
        self._seen_tokens = 0


class MHLAStaticCache(Cache):
    """Preallocated MHLA decode states of every layer (transformers' `StaticCache` for this model).

    Args:
        config: the model's `MHLAConfig`.
        max_batch_size: the most sequences decoded at once; a smaller batch uses the first rows.
        max_cache_len: the most tokens a sequence reaches (prompt and generated); default and upper limit
            `chunk_size * max_chunks`. Chunk slots are allocated for ceil(max_cache_len / chunk_size) chunks.
        device: where the buffers live (the model's device).
        dtype: the state dtype (fp32; fp64 for an fp64 model).

    A decode step always advances the cache in place, also under `use_cache=False`. After replaying a captured
    graph, the host's counters (`get_seq_length`, each state's `max_offset`) lag; `advance_host` moves them.
    """

    is_compileable = False  # our own CUDA-graph helper captures the step; torch.compile of the model is untested

    def __init__(
        self,
        config: Any,
        max_batch_size: int,
        max_cache_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        C, L = int(config.chunk_size), int(config.max_chunks)
        max_cache_len = C * L if max_cache_len is None else int(max_cache_len)
        if not 1 <= max_cache_len <= C * L:
            raise ValueError(
                f"max_cache_len must be in [1, chunk_size * max_chunks = {C} * {L} = {C * L}], got {max_cache_len}; "
                f"raise max_chunks in the config to at least {math.ceil(max_cache_len / C)} for longer sequences"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        H = int(config.num_heads)
        dk = int(config.hidden_size * config.expand_k) // H
        dv = int(config.hidden_size * config.expand_v) // H
        # private fields behind properties: some transformers versions (5.17) define these names as read-only
        # properties of Cache
        self._static_batch, self._static_len = int(max_batch_size), max_cache_len
        slots = math.ceil(max_cache_len / C)
        for _ in range(config.num_hidden_layers):
            state = StaticMHLAState.zeros(max_batch_size, H, slots, dk, dv, C, device=device, dtype=dtype)
            self.layers.append(MHLAStaticLayer(state))

    @property
    def max_batch_size(self) -> int:
        """The most sequences decoded at once."""
        return self._static_batch

    @property
    def max_cache_len(self) -> int:
        """The most tokens a sequence reaches (prompt and generated)."""
        return self._static_len

    def get_max_length(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def states(self) -> list[StaticMHLAState]:
        """The per-layer states."""
        return [layer.static_state for layer in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.layers[0].batch_repeat_interleave(repeats)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._seen_tokens = 0

    def advance_host(self, tokens: int) -> None:
        """Advance the host-side counters by `tokens` steps run without Python (replays of a captured graph)."""
        for layer in self.layers:
            layer._seen_tokens += tokens
            layer.static_state.max_offset += tokens
