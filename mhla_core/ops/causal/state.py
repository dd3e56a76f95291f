"""The recurrent state that causal MHLA passes from a prefill to token-by-token decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MHLAState:
    """Everything causal MHLA needs to continue a sequence (docs/spec.md section 2, recurrent form).

    Attributes:
        chunk_states: [B, H, L, Dk, Dv] states S_j of the completed chunks j < offset // C;
            slots of chunks not yet completed are zero. L is the mixing size.
        partial: [B, H, Dk, Dv] running state of the current, incomplete chunk.
        offsets: tokens consumed so far, one int per sequence.
        chunk_size: the chunk length C the state was built with.
    """

    chunk_states: torch.Tensor
    partial: torch.Tensor
    offsets: tuple[int, ...]
    chunk_size: int

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
        )

    @property
    def batch_size(self) -> int:
        return self.partial.shape[0]

    def select(self, index: int | slice) -> MHLAState:
        """The state of one sequence (int) or a range of sequences (slice), batch dim kept."""
        sl = slice(index, index + 1) if isinstance(index, int) else index
        return MHLAState(
            self.chunk_states[sl], self.partial[sl], self.offsets[sl], self.chunk_size
        )

    @staticmethod
    def cat(states: list[MHLAState]) -> MHLAState:
        """Stack per-sequence states along the batch dimension."""
        return MHLAState(
            torch.cat([s.chunk_states for s in states]),
            torch.cat([s.partial for s in states]),
            tuple(o for s in states for o in s.offsets),
            states[0].chunk_size,
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
        if len(self.offsets) != batch:
            raise ValueError(f"initial_state has {len(self.offsets)} offsets for {batch} sequences")
        if any(int(o) < 0 for o in self.offsets):
            raise ValueError(f"initial_state offsets must be ints >= 0 (tokens consumed), got {self.offsets}")
        if device is not None and (self.chunk_states.device != device or self.partial.device != device):
            raise ValueError(f"initial_state is on {self.chunk_states.device} / {self.partial.device}, q on {device}: "
                             "build it (chunk_states, partial) on the inputs' device")
        if self.chunk_size != chunk_size:
            raise ValueError(
                f"initial_state was built with chunk_size={self.chunk_size}, got chunk_size={chunk_size}"
            )
