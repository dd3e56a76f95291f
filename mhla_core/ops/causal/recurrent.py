"""Token-by-token causal MHLA (SPEC section 2, recurrent form) in PyTorch."""

from __future__ import annotations

import torch

from mhla_core.ops.causal.checks import check_length
from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.utils import accumulation_dtype, expand_mixing, host_to_device


def _mixed_state(
    W_strict: torch.Tensor, chunk_states: torch.Tensor, chunk_idx: torch.Tensor, n_used: int
) -> torch.Tensor:
    """S~_i = sum_{j < i} W[i, j] S_j for each sequence's current chunk i: [B, H, Dk, Dv].

    Reads only the first `n_used` chunk slots (n_used >= every sequence's i); one batched GEMV over (b, h).
    """
    B, H, L, Dk, Dv = chunk_states.shape
    if n_used == 0:
        return chunk_states.new_zeros(B, H, Dk, Dv)
    rows = W_strict[:, chunk_idx.clamp(max=L - 1)] * (chunk_idx < L).view(1, -1, 1)  # [H, B, L]
    rows = rows[..., :n_used].transpose(0, 1).reshape(B * H, 1, n_used)
    states = chunk_states[:, :, :n_used].reshape(B * H, n_used, Dk * Dv)
    return torch.bmm(rows, states).view(B, H, Dk, Dv)


def fused_recurrent_mhla_torch(
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
    for off in initial_state.offsets:
        check_length(off + T, C, L)
    W_strict = W.tril(-1)
    diag = W.diagonal(dim1=-2, dim2=-1)  # [H, L]
    chunk_states = initial_state.chunk_states.to(acc)
    partial = initial_state.partial.to(acc)
    offsets = torch.tensor(initial_state.offsets, dtype=torch.long)  # host copy: no device syncs
    idx = host_to_device(offsets // C, q.device)
    mixed = _mixed_state(W_strict, chunk_states, idx, min(L, int(offsets.max()) // C) if B else 0)
    slots = torch.arange(L, device=q.device)

    outs = []
    for t in range(T):
        qt = q[:, t].to(acc) * scale  # [B, H, Dk]
        kt, vt = k[:, t].to(acc), v[:, t].to(acc)
        partial = partial + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        w_ii = diag[:, idx].t()  # [B, H]
        read = mixed + w_ii[..., None, None] * partial
        outs.append(torch.einsum("bhk,bhkv->bhv", qt, read))
        offsets = offsets + 1
        finished = offsets % C == 0
        if bool(finished.any()):
            fin = host_to_device(finished, q.device)
            store = fin.view(B, 1, 1, 1, 1) & (slots == idx.view(B, 1)).view(B, 1, L, 1, 1)
            chunk_states = torch.where(store, partial.unsqueeze(2), chunk_states)
            partial = torch.where(fin.view(B, 1, 1, 1), torch.zeros_like(partial), partial)
            idx = host_to_device(offsets // C, q.device)
            n_used = min(L, int(offsets.max()) // C)
            mixed = torch.where(fin.view(B, 1, 1, 1), _mixed_state(W_strict, chunk_states, idx, n_used), mixed)

    o = torch.stack(outs, dim=1).to(v.dtype) if T else v.new_zeros(B, 0, H, Dv)
    final = MHLAState(chunk_states, partial, tuple(offsets.tolist()), C) if output_final_state else None
    return o, final
