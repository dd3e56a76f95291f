"""Token-by-token causal MHLA (docs/spec.md section 2, recurrent form) in PyTorch.

Shaped for decoding, where the host issuing ops bounds the speed: sequence offsets stay Python ints
(no host syncs, no small CPU-tensor ops), and each token costs a handful of ops.
"""

from __future__ import annotations

import torch

from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.utils import accumulation_dtype, expand_mixing, host_to_device


def _mixed_state(
    w_rows: torch.Tensor, chunk_states: torch.Tensor, chunk_idx: torch.Tensor, n_used: int
) -> torch.Tensor:
    """S~_i = sum_{j < i} W[i, j] S_j for each sequence's current chunk i: [B, H, Dk, Dv].

    `w_rows` is the strictly lower mixing as [L, H, L] (row i first); every chunk_idx must be < L. Reads only
    the first `n_used` chunk slots (n_used >= every sequence's i); one batched GEMV over (b, h).
    """
    B, H, L, Dk, Dv = chunk_states.shape
    if n_used == 0:
        return chunk_states.new_zeros(B, H, Dk, Dv)
    rows = w_rows[chunk_idx, :, :n_used].reshape(B * H, 1, n_used)
    states = chunk_states[:, :, :n_used].reshape(B * H, n_used, Dk * Dv)
    return torch.bmm(rows, states).view(B, H, Dk, Dv)


def naive_recurrent_mhla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    chunk_size: int,
    scale: float,
    initial_state: MHLAState | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, MHLAState | None]:
    """Decode T tokens one at a time from `initial_state`; exact against `chunk_mhla`."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    acc = accumulation_dtype(v.dtype)
    W = expand_mixing(mixing, H).to(acc)
    L = W.shape[-1]
    if initial_state is None:
        initial_state = MHLAState.zeros(B, H, L, Dk, Dv, C, device=q.device, dtype=acc)
    offsets = list(initial_state.offsets)  # fused_recurrent_mhla checked off + T <= L * C: chunk indices are < L
    w_rows = W.tril(-1).transpose(0, 1)  # [L, H, L]: row i of each head's strictly lower mixing
    diag = W.diagonal(dim1=-2, dim2=-1).t()  # [L, H]
    chunk_states = initial_state.chunk_states.to(acc)
    partial = initial_state.partial.to(acc)

    def chunk_index() -> torch.Tensor:
        return host_to_device(torch.tensor([off // C for off in offsets]), q.device)

    idx = chunk_index()
    mixed = _mixed_state(w_rows, chunk_states, idx, max((off // C for off in offsets), default=0))
    w_ii = diag[idx].view(B, H, 1, 1)

    outs = []
    for t in range(T):
        qt = (q[:, t].to(acc) * scale).view(B * H, 1, Dk)
        kt, vt = k[:, t].to(acc), v[:, t].to(acc)
        partial = torch.addcmul(partial, kt.unsqueeze(-1), vt.unsqueeze(-2))
        read = torch.addcmul(mixed, w_ii, partial)
        outs.append(torch.bmm(qt, read.view(B * H, Dk, Dv)).view(B, 1, H, Dv))
        offsets = [off + 1 for off in offsets]
        finished = [off % C == 0 for off in offsets]
        if any(finished):
            fin = host_to_device(torch.tensor(finished), q.device)
            # idx still holds each row's chunk before this token: for the finished rows, the chunk that just ended
            store = (fin.view(B, 1) & (torch.arange(L, device=q.device) == idx.view(B, 1))).view(B, 1, L, 1, 1)
            chunk_states = torch.where(store, partial.unsqueeze(2), chunk_states)
            partial = torch.where(fin.view(B, 1, 1, 1), torch.zeros_like(partial), partial)
            if t + 1 < T:  # the mixed state of the next token's chunk (not part of the returned state)
                idx = chunk_index()
                n_used = max(off // C for off in offsets)
                mixed = torch.where(fin.view(B, 1, 1, 1), _mixed_state(w_rows, chunk_states, idx, n_used), mixed)
                w_ii = diag[idx].view(B, H, 1, 1)

    o = (outs[0] if T == 1 else torch.cat(outs, dim=1)).to(v.dtype) if T else v.new_zeros(B, 0, H, Dv)
    final = MHLAState(chunk_states, partial, tuple(offsets), C) if output_final_state else None
    return o, final
