"""Token-by-token causal MHLA (docs/spec.md section 2, recurrent form) in PyTorch.

Two forms. `naive_recurrent_mhla` is functional and shaped for eager decoding, where the host issuing ops
bounds the speed: sequence offsets stay Python ints (no host syncs, no small CPU-tensor ops), each token
costs a handful of ops, and the mixed state S~_i comes from the state and is rebuilt from the stored chunk
states only by a token that completes a chunk. `naive_static_step_` updates a `StaticMHLAState` in place
with offsets on the device and no host branching; it pays for that with a masked rebuild of S~ every token.
"""

from __future__ import annotations

import torch

from mhla_core.ops.causal.state import MHLAState, StaticMHLAState
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
    """Decode T tokens one at a time from `initial_state`; exact against `chunk_mhla`.

    The mixed state is taken from `initial_state.mixed` unless it is None or the mixing needs a gradient
    (then it is rebuilt from the chunk states, so that the gradient reaches W through every S_j).
    """
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

    def chunk_index() -> tuple[torch.Tensor, int]:
        """Each row's current chunk on the device (a full sequence's clamped to L - 1), and the largest."""
        idx = [min(off // C, L - 1) for off in offsets]
        return host_to_device(torch.tensor(idx), q.device), max(idx, default=0)

    idx, top = chunk_index()
    rebuild = initial_state.mixed is None or (torch.is_grad_enabled() and mixing.requires_grad)
    mixed = _mixed_state(w_rows, chunk_states, idx, top) if rebuild else initial_state.mixed.to(acc)
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
        if any(finished):  # host ints: rows that completed a chunk store it and rebuild their mixed state
            fin = host_to_device(torch.tensor(finished), q.device)
            # idx still holds each row's chunk before this token: for the finished rows, the chunk that just ended
            store = (fin.view(B, 1) & (torch.arange(L, device=q.device) == idx.view(B, 1))).view(B, 1, L, 1, 1)
            chunk_states = torch.where(store, partial.unsqueeze(2), chunk_states)
            partial = torch.where(fin.view(B, 1, 1, 1), torch.zeros_like(partial), partial)
            idx, top = chunk_index()
            mixed = torch.where(fin.view(B, 1, 1, 1), _mixed_state(w_rows, chunk_states, idx, top), mixed)
            w_ii = diag[idx].view(B, H, 1, 1)

    o = (outs[0] if T == 1 else torch.cat(outs, dim=1)).to(v.dtype) if T else v.new_zeros(B, 0, H, Dv)
    final = MHLAState(chunk_states, partial, tuple(offsets), C, mixed) if output_final_state else None
    return o, final


def naive_static_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    state: StaticMHLAState,
    scale: float,
) -> torch.Tensor:
    """Decode T tokens of rows [0, B) of `state` in place; offsets stay on the device, no host branching.

    Per token: o from the stored mixed state and the partial; every row writes its current chunk slot
    (the completed state or the slot's old value) and its mixed state (rebuilt over all S slots, or kept),
    selected on the device by whether the token completed the chunk.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        return v.new_zeros(B, 0, H, Dv)
    C, S = state.chunk_size, state.num_chunks
    acc = state.partial.dtype
    W = expand_mixing(mixing, H).to(acc)
    L = W.shape[-1]
    w_rows = W.tril(-1)[:, :, :S].transpose(0, 1)  # [L, H, S]
    diag = W.diagonal(dim1=-2, dim2=-1).t()  # [L, H]
    cs, partial, mixed, offsets = state.chunk_states[:B], state.partial[:B], state.mixed[:B], state.offsets[:B]
    slots = cs.view(B * H * S, Dk, Dv)
    first_slot = (torch.arange(B, device=q.device).view(B, 1) * H + torch.arange(H, device=q.device)) * S  # [B, H]

    outs = []
    for t in range(T):
        i = torch.clamp(offsets // C, max=S - 1)  # a step past the capacity is refused on the host
        qt = (q[:, t].to(acc) * scale).view(B * H, 1, Dk)
        p = torch.addcmul(partial, k[:, t].to(acc).unsqueeze(-1), v[:, t].to(acc).unsqueeze(-2))
        read = torch.addcmul(mixed, diag[i].view(B, H, 1, 1), p)
        outs.append(torch.bmm(qt, read.view(B * H, Dk, Dv)).view(B, 1, H, Dv))
        end = ((offsets + 1) % C == 0).view(B, 1, 1, 1)
        slot = (first_slot + i.view(B, 1)).view(B * H)
        old = slots.index_select(0, slot).view(B, H, Dk, Dv)
        slots.index_copy_(0, slot, torch.where(end, p, old).view(B * H, Dk, Dv))
        nxt = i + 1  # the next chunk: its row of W reaches the slot just written
        w_next = w_rows[torch.clamp(nxt, max=L - 1)] * (nxt < L).view(B, 1, 1).to(acc)  # [B, H, S]
        rebuilt = torch.bmm(w_next.view(B * H, 1, S), cs.reshape(B * H, S, Dk * Dv)).view(B, H, Dk, Dv)
        mixed.copy_(torch.where(end, rebuilt, mixed))
        partial.copy_(torch.where(end, torch.zeros_like(p), p))
        offsets.add_(1)
    return (outs[0] if T == 1 else torch.cat(outs, dim=1)).to(v.dtype)
