"""The recurrent states that causal MHLA passes from a prefill to token-by-token decoding.

`MHLAState` is functional (the ops return a new one; offsets are Python ints). `StaticMHLAState` is a
preallocated buffer set that a decode step updates in place, offsets on the device, for decoding without
host syncs (a step that a CUDA graph can capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhla_core.ops.utils import expand_mixing, host_to_device


def mix_chunk_states(mixing: torch.Tensor, chunk_states: torch.Tensor, chunk_idx: torch.Tensor) -> torch.Tensor:
    """S~_i = sum_{j < i} W[i, j] S_j for each sequence's chunk i = chunk_idx[b] (docs/spec.md section 2).

    Args:
        mixing: [L, L] or [H, L, L]; only the strictly lower triangle is read.
        chunk_states: [B, H, S, Dk, Dv] with S <= L chunk slots.
        chunk_idx: [B] integer chunk indices, each < L, on chunk_states' device.

    Returns:
        [B, H, Dk, Dv] in chunk_states' dtype.
    """
    B, H, S, Dk, Dv = chunk_states.shape
    W = expand_mixing(mixing, H).to(chunk_states.dtype)
    rows = W.tril(-1)[:, :, :S].transpose(0, 1)[chunk_idx]  # [B, H, S]
    return torch.bmm(rows.reshape(B * H, 1, S), chunk_states.reshape(B * H, S, Dk * Dv)).view(B, H, Dk, Dv)


@dataclass
class MHLAState:
    """Everything causal MHLA needs to continue a sequence (docs/spec.md section 2, recurrent form).

    Attributes:
        chunk_states: [B, H, L, Dk, Dv] states S_j of the completed chunks j < offset // C;
            slots of chunks not yet completed are zero. L is the mixing size.
        partial: [B, H, Dk, Dv] running state of the current, incomplete chunk.
        offsets: tokens consumed so far, one int per sequence.
        chunk_size: the chunk length C the state was built with.
        mixed: [B, H, Dk, Dv] the mixed state S~_i = sum_{j < i} W[i, j] S_j of each sequence's current
            chunk i = offset // C, under the mixing W the state was decoded with; None until a decode step
            computes it (`chunk_mhla` returns None here). A state continues only under that mixing: after
            changing W, drop it (`state.mixed = None`). Undefined for a sequence that fills all L chunks.
    """

    chunk_states: torch.Tensor
    partial: torch.Tensor
    offsets: tuple[int, ...]
    chunk_size: int
    mixed: torch.Tensor | None = None

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        num_chunks: int,
        dk: int,
        dv: int,
        chunk_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MHLAState:
        """The state of `batch` empty sequences."""
        return cls(
            chunk_states=torch.zeros(batch, heads, num_chunks, dk, dv, device=device, dtype=dtype),
            partial=torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
            offsets=(0,) * batch,
            chunk_size=chunk_size,
            mixed=torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.partial.shape[0]

    def select(self, index: int | slice) -> MHLAState:
        """The state of one sequence (int) or a range of sequences (slice), batch dim kept."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        mixed = None if self.mixed is None else self.mixed[sl]
        return MHLAState(self.chunk_states[sl], self.partial[sl], self.offsets[sl], self.chunk_size, mixed)

    @staticmethod
    def cat(states: list[MHLAState]) -> MHLAState:
        """Stack per-sequence states along the batch dimension (`mixed` only where every state has it)."""
        mixed = None if any(s.mixed is None for s in states) else torch.cat([s.mixed for s in states])
        return MHLAState(
            torch.cat([s.chunk_states for s in states]),
            torch.cat([s.partial for s in states]),
            tuple(o for s in states for o in s.offsets),
            states[0].chunk_size,
            mixed,
        )

    def check(self, batch: int, heads: int, num_chunks: int, dk: int, dv: int, chunk_size: int,
              device: torch.device | None = None) -> None:
        """Raise ValueError if this state cannot continue sequences of the given shape (on `device`)."""
        want = (batch, heads, num_chunks, dk, dv)
        if tuple(self.chunk_states.shape) != want or tuple(self.partial.shape) != (batch, heads, dk, dv):
            raise ValueError(
                f"initial_state has chunk_states {tuple(self.chunk_states.shape)} and partial "
                f"{tuple(self.partial.shape)}; expected [B, H, L, Dk, Dv] = {list(want)}"
            )
        if self.mixed is not None and tuple(self.mixed.shape) != (batch, heads, dk, dv):
            raise ValueError(
                f"initial_state has mixed {tuple(self.mixed.shape)}; expected [B, H, Dk, Dv] = "
                f"{[batch, heads, dk, dv]} (or None)"
            )
        if len(self.offsets) != batch:
            raise ValueError(f"initial_state has {len(self.offsets)} offsets for {batch} sequences")
        if any(int(o) < 0 for o in self.offsets):
            raise ValueError(f"initial_state offsets must be ints >= 0 (tokens consumed), got {self.offsets}")
        tensors = [self.chunk_states, self.partial] + ([] if self.mixed is None else [self.mixed])
        if device is not None and any(t.device != device for t in tensors):
            raise ValueError(f"initial_state is on {self.chunk_states.device} / {self.partial.device}, q on {device}: "
                             "build it (chunk_states, partial, mixed) on the inputs' device")
        if self.chunk_size != chunk_size:
            raise ValueError(
                f"initial_state was built with chunk_size={self.chunk_size}, got chunk_size={chunk_size}"
            )


@dataclass
class StaticMHLAState:
    """Preallocated decode state of up to `batch_size` sequences, updated in place (docs/nlp.md, static cache).

    The decode step (`fused_recurrent_mhla_static`) reads and writes these buffers and the device offsets
    only, with no host sync, so the buffers keep their addresses across steps (a CUDA graph can capture it).

    Attributes:
        chunk_states: [B, H, S, Dk, Dv] states of the completed chunks; S <= L slots (the cache's max chunks).
        partial: [B, H, Dk, Dv] running state of each sequence's current chunk.
        mixed: [B, H, Dk, Dv] mixed state S~_i of each sequence's current chunk i (as in `MHLAState.mixed`).
        offsets: [B] int64 tokens consumed per sequence, on the buffers' device.
        chunk_size: the chunk length C.
        max_offset: host-side upper bound of every offset (for length checks without reading `offsets`);
            a step run by replaying a captured graph does not advance it.
        empty: True until a prefill is loaded or a step runs (a fresh or reset state).
    """

    chunk_states: torch.Tensor
    partial: torch.Tensor
    mixed: torch.Tensor
    offsets: torch.Tensor
    chunk_size: int
    max_offset: int = 0
    empty: bool = True

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        num_chunks: int,
        dk: int,
        dv: int,
        chunk_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> StaticMHLAState:
        """Buffers for `batch` sequences of up to `num_chunks * chunk_size` tokens."""
        if batch < 1 or num_chunks < 1 or chunk_size < 1:
            raise ValueError(f"batch, num_chunks and chunk_size must be >= 1, got {batch}, {num_chunks}, {chunk_size}")
        return cls(
            chunk_states=torch.zeros(batch, heads, num_chunks, dk, dv, device=device, dtype=dtype),
            partial=torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
            mixed=torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
            offsets=torch.zeros(batch, device=device, dtype=torch.int64),
            chunk_size=chunk_size,
        )

    @property
    def batch_size(self) -> int:
        return self.partial.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.chunk_states.shape[2]

    @property
    def max_length(self) -> int:
        """The most tokens a sequence may reach: num_chunks * chunk_size."""
        return self.num_chunks * self.chunk_size

    @property
    def device(self) -> torch.device:
        return self.partial.device

    def reset_(self) -> None:
        """Zero every buffer in place (the sequences restart empty)."""
        for t in (self.chunk_states, self.partial, self.mixed, self.offsets):
            t.zero_()
        self.max_offset, self.empty = 0, True

    @torch.no_grad()
    def load_(self, state: MHLAState, mixing: torch.Tensor) -> None:
        """Copy `state` (e.g. a prefill's final state) into rows [0, state.batch_size), in place.

        Rows past it restart empty. `mixing` ([L, L] or [H, L, L]) gives the mixed states when `state.mixed`
        is None. Reads `state.offsets` on the host (no sync).
        """
        b, H, L, Dk, Dv = state.chunk_states.shape
        if state.chunk_size != self.chunk_size:
            raise ValueError(f"state has chunk_size={state.chunk_size}, the static state {self.chunk_size}")
        if b > self.batch_size or (H, Dk, Dv) != (self.partial.shape[1], *self.partial.shape[2:]):
            raise ValueError(
                f"state has [B, H, Dk, Dv] = {[b, H, Dk, Dv]}; the static state holds up to "
                f"{[self.batch_size, *self.partial.shape[1:]]} (max batch size first)"
            )
        if L < self.num_chunks:
            raise ValueError(f"state has {L} chunk slots, fewer than the static state's {self.num_chunks}")
        top = max(state.offsets, default=0)
        if top > self.max_length:
            raise ValueError(
                f"a sequence of the state holds {top} tokens, more than the static state's num_chunks * chunk_size "
                f"= {self.num_chunks} * {self.chunk_size} = {self.max_length}; allocate it with max_cache_len >= {top}"
            )
        S = self.num_chunks
        mixed = state.mixed
        if mixed is None:
            idx = host_to_device(torch.tensor([min(o // self.chunk_size, L - 1) for o in state.offsets]),
                                 state.partial.device)
            mixed = mix_chunk_states(mixing.detach(), state.chunk_states, idx)
        self.reset_()
        self.chunk_states[:b].copy_(state.chunk_states[:, :, :S])
        self.partial[:b].copy_(state.partial)
        self.mixed[:b].copy_(mixed)
        self.offsets[:b].copy_(host_to_device(torch.tensor(state.offsets, dtype=torch.int64), self.device))
        self.max_offset, self.empty = top, False

    def to_state(self, num_chunks: int, batch: int | None = None) -> MHLAState:
        """The first `batch` rows (default all) as an `MHLAState` with `num_chunks` (the mixing size L) slots.

        Reads the offsets back to the host: one sync, for a multi-token continuation, not for decoding.
        """
        b = self.batch_size if batch is None else batch
        cs = self.chunk_states[:b]
        pad = cs.new_zeros(b, cs.shape[1], num_chunks - cs.shape[2], *cs.shape[3:])
        offsets = tuple(int(o) for o in self.offsets[:b].tolist())
        return MHLAState(torch.cat([cs, pad], dim=2), self.partial[:b].clone(), offsets, self.chunk_size,
                         self.mixed[:b].clone())
