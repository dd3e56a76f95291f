"""Pure-PyTorch chunked causal MHLA (docs/spec.md section 2): the reference every kernel must match."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mhla_core.ops.causal.checks import check_length
from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.utils import accumulation_dtype, expand_mixing


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _nonfinite_before(x: torch.Tensor, dim: int, inclusive: bool = False) -> torch.Tensor:
    """Per entry: whether any entry at an earlier index along `dim` (or the same, when inclusive)
    is non-finite; the NaN pattern of a causal sum over that axis."""
    bad = (~torch.isfinite(x)).to(torch.int32).cumsum(dim) > 0
    if inclusive:
        return bad
    first = torch.zeros_like(bad.narrow(dim, 0, 1))
    return torch.cat([first, bad.narrow(dim, 0, bad.shape[dim] - 1)], dim=dim)


def _chunk_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    C: int,
    scale: float,
    state: MHLAState,
) -> tuple[torch.Tensor, MHLAState]:
    """Chunked MHLA for sequences that all start at the same offset `state.offsets[0]`.

    q, k, v: [B, T, H, D] in the accumulation dtype; W: [H, L, L].
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    L = W.shape[-1]
    off = state.offsets[0]
    if T == 0:  # an empty document: no output, the state passes through
        return v.new_zeros(B, 0, H, Dv), state
    i0, p = divmod(off, C)
    check_length(off + T, C, L)
    n = math.ceil((p + T) / C)  # chunks touched by this call, the first possibly partial
    pad = (0, 0, 0, 0, p, n * C - p - T)  # p tokens before (already in state.partial), the rest after
    qc = F.pad(q, pad).reshape(B, n, C, H, Dk) * scale
    kc = F.pad(k, pad).reshape(B, n, C, H, Dk)
    vc = F.pad(v, pad).reshape(B, n, C, H, Dv)

    local = torch.einsum("bnchk,bnchv->bhnkv", kc, vc)  # S of each touched chunk (this call's part)
    first = (local[:, :, :1] + state.partial.unsqueeze(2)).to(local.dtype)
    touched = torch.cat([first, local[:, :, 1:]], dim=2)  # [B, H, n, Dk, Dv]
    states = torch.cat([state.chunk_states[:, :, :i0], touched], dim=2)  # chunks 0 .. i0+n-1

    rows = torch.arange(i0, i0 + n, device=q.device)
    cols = torch.arange(i0 + n, device=q.device)
    inter_w = W[:, i0 : i0 + n, : i0 + n] * (cols[None, :] < rows[:, None])  # strictly earlier chunks
    # later chunks enter with weight 0, so their non-finite entries are kept out of the product
    # (0 * NaN = NaN) and marked from the earlier ones alone (docs/spec.md section 5)
    inter = torch.einsum("hij,bhjkv->bhikv", inter_w, _finite_or_zero(states))
    inter = inter.masked_fill(_nonfinite_before(states, dim=2)[:, :, i0 : i0 + n], float("nan"))
    diag = W[:, rows, rows]  # [H, n]
    # the part of the first chunk seen before this call enters like an earlier state, weighted W[i0, i0]
    carried = torch.zeros_like(inter)
    carried[:, :, 0] = state.partial * diag[:, 0].view(1, H, 1, 1)
    o_inter = torch.einsum("bnchk,bhnkv->bnchv", qc, inter + carried)

    scores = torch.einsum("bnchk,bnuhk->bnhcu", qc, kc)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, 0) * diag.t().reshape(1, n, H, 1, 1)
    o_intra = torch.einsum("bnhcu,bnuhv->bnchv", scores, _finite_or_zero(vc))
    o_intra = o_intra.masked_fill(_nonfinite_before(vc, dim=2, inclusive=True), float("nan"))
    o = (o_inter + o_intra).reshape(B, n * C, H, Dv)[:, p : p + T]

    end = off + T
    i_end, p_end = divmod(end, C)
    done = min(i_end, L)
    chunk_states = torch.cat(
        [states[:, :, :done], states.new_zeros(B, H, L - done, Dk, Dv)], dim=2
    )
    partial = states[:, :, i_end] if p_end else states.new_zeros(B, H, Dk, Dv)
    return o, MHLAState(chunk_states, partial, (end,) * B, C)


def naive_chunk_mhla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    chunk_size: int,
    scale: float,
    initial_state: MHLAState | None,
    output_final_state: bool,
    cu_seqlens: list[int] | None,
) -> tuple[torch.Tensor, MHLAState | None]:
    """Chunked causal MHLA on checked inputs; loops over documents and distinct offsets only."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = accumulation_dtype(v.dtype)
    W = expand_mixing(mixing, H).to(acc)
    L = W.shape[-1]
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)

    if cu_seqlens is None:
        spans = [(b, b + 1, slice(None)) for b in range(B)]  # (batch lo, batch hi, tokens)
    else:
        spans = [(0, 1, slice(lo, hi)) for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    num_seqs = len(spans)
    if initial_state is None:
        initial_state = MHLAState.zeros(num_seqs, H, L, Dk, Dv, chunk_size, device=q.device, dtype=acc)
    state = MHLAState(
        initial_state.chunk_states.to(acc), initial_state.partial.to(acc), initial_state.offsets, chunk_size
    )

    if cu_seqlens is None and len(set(state.offsets)) == 1:  # one batched pass
        o, final = _chunk_group(qa, ka, va, W, chunk_size, scale, state)
        return o.to(v.dtype), (final if output_final_state else None)

    outs, finals = [], []
    for s, (blo, bhi, toks) in enumerate(spans):
        o, final = _chunk_group(
            qa[blo:bhi, toks], ka[blo:bhi, toks], va[blo:bhi, toks], W, chunk_size, scale, state.select(s)
        )
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1 if cu_seqlens is not None else 0)
    return o.to(v.dtype), (MHLAState.cat(finals) if output_final_state else None)
