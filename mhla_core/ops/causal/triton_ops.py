"""Triton backend of causal chunked MHLA: custom ops `mhla::chunk_fwd` / `mhla::chunk_bwd` and `chunk_mhla_triton`.

Pipeline (see docs/kernels_causal.md):
    forward : S = per-chunk K^T V  ->  S~ = strict-lower mixing of S (+ initial-state term)  ->  o
    backward: recompute S, S~ (unless SAVE_STATES); dS~ = s Q^T dO; dS = mixing^T dS~;
              dW off-diagonal from <dS~, S>; dq, dk from (dO, V, S~, dS); dv and the dW diagonal
              from (Q, K, dS, dO) (two kernels, or one with LAUNCH["bwd_fused"]).
Accumulation is fp32 throughout; see the numerics settings below for storage. Supported: fp32 /
bf16 / fp16 inputs, shared or per-head mixing, partial last chunks, packed documents (cu_seqlens),
any initial_state offsets (the part of the mixed state that comes from the initial state is
computed in PyTorch and enters the op as an additive tensor, so gradients flow to the initial
state too), output_final_state (with gradients through it).
"""

import math
import os

import torch
import triton

from mhla_core.ops.causal import triton_kernels as K
from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.triton_helpers import next_pow2
from mhla_core.ops.utils import expand_mixing

# Launch parameters; the GPU sweep may change them. Block sizes are clipped to the problem size.
LAUNCH: dict[str, dict[str, int]] = {
    "state": {"BX": 64, "BY": 64, "num_warps": 4, "num_stages": 2},
    "fwd_o": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
    "mix": {"BM": 64, "BN": 128, "BR": 32, "num_warps": 8, "num_stages": 3},
    "mix_grad": {"BM": 32, "BN": 32, "BX": 128, "num_warps": 4, "num_stages": 3, "x_per_program": 2048},
    "dqdk": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
    # fused dq/dk/dv kernel (one program per chunk and head, all of Dk): used when fused=1 and Dk <= max_dk
    "bwd_fused": {"fused": 0, "max_dk": 128, "BV": 32, "num_warps": 8, "num_stages": 2},
    "dv": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
}
# Numerics of half (bf16 / fp16) inputs; fp32 inputs always run exact fp32 dots on fp32 states.
# MIX_PREC_HALF: operand precision of the chunk-mixing GEMMs (S~ = W S, dS = W^T dS~, dW = dS~ S^T):
#   "tf32" (default) or "bf16" (operands rounded to bf16, twice the tensor-core rate).
# STATE_HALF: keep the internal chunk states S and dS~ in bf16 instead of fp32 (halves their traffic;
#   returned final states stay fp32). S~ and dS are stored in the input dtype in any case: the
#   kernels that read them round them to it before their dots, so that loses nothing.
# SAVE_STATES: keep S and S~ from the forward for the backward instead of recomputing them (two
#   kernels less in the backward, at Nchunks * H * Dk * Dv * (4 + 2) bytes of memory per call).
MIX_PREC_HALF = "tf32"
STATE_HALF = False
SAVE_STATES = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _p2(x: int, cap: int) -> int:
    return min(next_pow2(cap), next_pow2(x))


def _launch(name: str) -> dict[str, int]:
    cfg = LAUNCH[name]
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# ----------------------------------------------------------------------------------------------
# tensor-level kernels


def _chunk_states(x, y, tbl, scale, dots, dtype):
    """[Nrows, H, Dx, Dy]: scale * X_c^T Y_c per chunk row c, accumulated in fp32, stored as `dtype`."""
    H, DX, DY = x.shape[-2], x.shape[-1], y.shape[-1]
    NR = tbl.shape[0]
    out = torch.empty(NR, H, DX, DY, device=x.device, dtype=dtype)
    if NR == 0:
        return out
    cfg = LAUNCH["state"]
    BX, BY = _p2(DX, cfg["BX"]), _p2(DY, cfg["BY"])
    BC = dots["BC"]
    grid = (NR * H * triton.cdiv(DX, BX) * triton.cdiv(DY, BY),)
    K.chunk_state_kernel[grid](x, y, out, tbl, scale, H, DX, DY, BC=BC, BX=BX, BY=BY, PREC=dots["prec"],
                               **_launch("state"))
    return out


def _mix(s, W, tbl, add, trans, prec, dtype):
    """Strict-lower mixing of the chunk states of each sequence (transposed for the backward)."""
    NR, H, DK, DV = s.shape
    X = DK * DV
    L = W.shape[-1]
    out = torch.empty(s.shape, device=s.device, dtype=dtype)
    if NR == 0:
        return out
    cfg = LAUNCH["mix"]
    BM, BR = _p2(NR, cfg["BM"]), _p2(NR, cfg["BR"])
    BN = _p2(X, cfg["BN"])
    grid = (triton.cdiv(NR, BM), triton.cdiv(X, BN), H)
    K.mix_kernel[grid](s, W, add if add is not None else s, out, tbl, NR, H, X, L,
                       TRANS=trans, HAS_ADD=add is not None, BM=BM, BN=BN, BR=BR, PREC=prec,
                       **_launch("mix"))
    return out


def _mix_grad(g, s, tbl, dw, prec):
    """dw[h, w(q), w(r)] += <g[q, h], s[r, h]> over r < q of one sequence."""
    NR, H, DK, DV = s.shape
    X = DK * DV
    L = dw.shape[-1]
    if NR == 0:
        return
    cfg = LAUNCH["mix_grad"]
    BM, BN = _p2(NR, cfg["BM"]), _p2(NR, cfg["BN"])
    BX = _p2(X, cfg["BX"])
    nqb, nrb = triton.cdiv(NR, BM), triton.cdiv(NR, BN)
    per = triton.cdiv(max(cfg["x_per_program"], BX), BX) * BX  # split-K over the state columns
    split = triton.cdiv(X, per)
    K.mix_grad_kernel[(nqb * nrb, H, split)](g, s, dw, tbl, NR, H, X, L, nrb, per,
                                             BM=BM, BN=BN, BX=BX, PREC=prec, **_launch("mix_grad"))


def _dots(q, C):
    return {"BC": next_pow2(C), "prec": "ieee" if q.dtype == torch.float32 else "tf32"}


def _fwd_impl(q, k, v, W, extra, tbl, C, scale, s_dtype, mprec):
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    dots = _dots(q, C)
    S = _chunk_states(k, v, tbl, 1.0, dots, s_dtype)
    St = _mix(S, W, tbl, extra, False, mprec, q.dtype)
    o = torch.empty(B, T, H, DV, device=q.device, dtype=v.dtype)
    NR = tbl.shape[0]
    if NR:
        cfg = LAUNCH["fwd_o"]
        BK, BV = _p2(DK, cfg["BK"]), _p2(DV, cfg["BV"])
        K.chunk_fwd_o_kernel[(NR * H * triton.cdiv(DV, BV),)](
            q, k, v, St, W, o, tbl, scale, H, DK, DV, W.shape[-1],
            BC=dots["BC"], BK=BK, BV=BV, PREC=dots["prec"], **_launch("fwd_o"))
    return o, S, St


def _bwd_impl(do, dS_out, q, k, v, W, extra, S, St, tbl, C, scale, s_dtype, mprec, need_dw):
    H, DK, DV = q.shape[2], q.shape[3], v.shape[3]
    L = W.shape[-1]
    NR = tbl.shape[0]
    dots = _dots(q, C)
    if S.numel() == 0 and NR:  # not saved by the forward: recompute
        S = _chunk_states(k, v, tbl, 1.0, dots, s_dtype)
    if St.numel() == 0 and NR:
        St = _mix(S, W, tbl, extra, False, mprec, q.dtype)
    dSt = _chunk_states(q, do, tbl, scale, dots, s_dtype)
    dS = _mix(dSt, W, tbl, dS_out if dS_out.numel() else None, True, mprec, q.dtype)
    dW = torch.zeros(H, L, L, device=q.device, dtype=torch.float32)
    if need_dw:  # a frozen mixing skips the largest backward GEMM
        _mix_grad(dSt, S, tbl, dW, mprec)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fcfg = LAUNCH["bwd_fused"]
    if NR and fcfg["fused"] and DK <= fcfg["max_dk"]:
        BV = _p2(DV, fcfg["BV"])
        K.chunk_bwd_fused_kernel[(NR * H,)](
            q, k, v, do, St, dS, W, dq, dk, dv, dW, tbl, scale, H, DK, DV, L,
            BC=dots["BC"], BK=next_pow2(DK), BV=BV, PREC=dots["prec"], **_launch("bwd_fused"))
    elif NR:
        cfg = LAUNCH["dqdk"]
        BK, BV = _p2(DK, cfg["BK"]), _p2(DV, cfg["BV"])
        K.chunk_bwd_dqdk_kernel[(NR * H * triton.cdiv(DK, BK),)](
            q, k, v, do, St, dS, W, dq, dk, tbl, scale, H, DK, DV, L,
            BC=dots["BC"], BK=BK, BV=BV, PREC=dots["prec"], **_launch("dqdk"))
        cfg = LAUNCH["dv"]
        BK, BV = _p2(DK, cfg["BK"]), _p2(DV, cfg["BV"])
        K.chunk_bwd_dv_kernel[(NR * H * triton.cdiv(DV, BV),)](
            q, k, v, do, dS, W, dv, dW, tbl, scale, H, DK, DV, L,
            BC=dots["BC"], BK=BK, BV=BV, PREC=dots["prec"], **_launch("dv"))
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    d_extra = dSt.float() if extra is not None else dSt.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dW, d_extra


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("mhla::chunk_fwd", mutates_args=())
def chunk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, extra: torch.Tensor | None,
    table: torch.Tensor, chunk_size: int, scale: float, return_states: bool, save_states: bool,
    state_half: bool, mix_prec: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv], S [Nrows, H, Dk, Dv], S~ [Nrows, H, Dk, Dv]).

    q, k, v: contiguous [B, T, H, D] of one dtype; W: fp32 [H, L, L]; extra: None or fp32
    [Nrows, H, Dk, Dv] added to the mixed state of every chunk row; table: int32 [Nrows, NCOL] chunk rows
    (see triton_kernels). S (fp32 when return_states, else bf16 when state_half) is returned when
    return_states or save_states, S~ (input dtype) when save_states; otherwise they are empty tensors.
    mix_prec: operand precision of the mixing GEMM ("ieee", "tf32" or "bf16").
    """
    s_dtype = torch.bfloat16 if (state_half and not return_states) else torch.float32
    o, S, St = _fwd_impl(q, k, v, W, extra, table, chunk_size, scale, s_dtype, mix_prec)
    if not (return_states or save_states):
        S = S.new_empty(0)
    if not save_states:
        St = St.new_empty(0)
    return o, S, St


@chunk_fwd.register_fake
def _(q, k, v, W, extra, table, chunk_size, scale, return_states, save_states, state_half, mix_prec):
    shape = (table.shape[0], q.shape[2], q.shape[3], v.shape[3])
    s_dtype = torch.bfloat16 if (state_half and not return_states) else torch.float32
    S = q.new_empty(shape if (return_states or save_states) else (0,), dtype=s_dtype)
    St = q.new_empty(shape if save_states else (0,))
    return v.new_empty(v.shape), S, St


@torch.library.custom_op("mhla::chunk_bwd", mutates_args=())
def chunk_bwd(
    do: torch.Tensor, dS_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor,
    extra: torch.Tensor | None, S: torch.Tensor, St: torch.Tensor, table: torch.Tensor, chunk_size: int,
    scale: float, state_half: bool, mix_prec: str, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dW [H, L, L] fp32, d extra fp32 (empty when extra is None)).

    dS_out: gradient of the returned S, or empty; S, St: the forward's saved states, or empty to recompute.
    need_dw=False leaves the off-diagonal of dW zero (frozen mixing).
    """
    s_dtype = torch.bfloat16 if state_half else torch.float32
    return _bwd_impl(do, dS_out, q, k, v, W, extra, S, St, table, chunk_size, scale, s_dtype, mix_prec, need_dw)


@chunk_bwd.register_fake
def _(do, dS_out, q, k, v, W, extra, S, St, table, chunk_size, scale, state_half, mix_prec, need_dw):
    shape = (0,) if extra is None else (table.shape[0], q.shape[2], q.shape[3], v.shape[3])
    d_extra = q.new_empty(shape, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), W.new_empty(W.shape), d_extra


def _setup_context(ctx, inputs, output):
    q, k, v, W, extra, table, chunk_size, scale, _, save_states, state_half, mix_prec = inputs
    _, S, St = output
    if not save_states:
        S, St = S.new_empty(0), St.new_empty(0)
    ctx.save_for_backward(q, k, v, W, extra, table, S, St)
    ctx.args = (chunk_size, scale, state_half, mix_prec)


def _backward(ctx, do, dS, dSt):
    q, k, v, W, extra, table, S, St = ctx.saved_tensors
    dS = q.new_empty(0, dtype=torch.float32) if dS is None or dS.numel() == 0 else dS.float().contiguous()
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dq, dk, dv, dW, d_extra = chunk_bwd(do, dS, q, k, v, W, extra, S, St, table, *ctx.args,
                                        ctx.needs_input_grad[3])
    return dq, dk, dv, dW, (d_extra if extra is not None else None), None, None, None, None, None, None, None


chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# chunk table and the public entry


def _table_rows(spans: tuple[tuple[int, int, int], ...], C: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Chunk rows for sequences given as (first token, length, offset); also (first row, rows) per sequence."""
    rows: list[int] = []
    per_seq = []
    for tok0, n, off in spans:
        i0, p = divmod(off, C)
        nrows = math.ceil((p + n) / C) if n > 0 else 0
        first = len(rows) // K.NCOL.value
        last = first + nrows - 1
        for j in range(nrows):
            a = max(j * C - p, 0)
            b = min((j + 1) * C - p, n)
            rows += [tok0 + a, b - a, first, last, i0 + j]  # columns TOK, LEN, FIRST, LAST, WIDX
        per_seq.append((first, nrows))
    return rows, per_seq


_TABLES: dict = {}


def _table(spans, C, device):
    key = (spans, C, str(device))
    hit = None if torch.compiler.is_compiling() else _TABLES.get(key)
    if hit is None:
        rows, per_seq = _table_rows(spans, C)
        hit = (torch.tensor(rows, dtype=torch.int32).view(-1, K.NCOL.value).to(device), per_seq)
        if not torch.compiler.is_compiling():
            if len(_TABLES) > 64:
                _TABLES.clear()
            _TABLES[key] = hit
    return hit


def chunk_mhla_triton(
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
    """Chunked causal MHLA with the Triton kernels, on inputs already checked by `chunk_mhla`."""
    if v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {v.dtype}; "
                         "use backend='torch' for float64")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    C = chunk_size
    dt = v.dtype
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    W = expand_mixing(mixing, H).to(torch.float32).contiguous()
    L = W.shape[-1]

    if cu_seqlens is None:
        seqs = [(b * T, T) for b in range(B)]
    else:
        seqs = [(a, b - a) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    offsets = initial_state.offsets if initial_state is not None else (0,) * len(seqs)
    spans = tuple((t0, n, off) for (t0, n), off in zip(seqs, offsets))
    table, per_seq = _table(spans, C, q.device)

    extra = None
    if initial_state is not None:
        S0 = initial_state.chunk_states.to(torch.float32)
        P0 = initial_state.partial.to(torch.float32)
        parts = []
        for s, (_, nrows) in enumerate(per_seq):
            i0 = offsets[s] // C
            rows_w = W[:, i0 : i0 + nrows]  # [H, n, L]
            # earlier complete chunks j < i0, plus the carried partial state of chunk i0 weighted W[i, i0]
            e = torch.einsum("hij,hjkv->ihkv", rows_w[:, :, :i0], S0[s, :, :i0])
            e = e + rows_w[:, :, i0].t()[:, :, None, None] * P0[s][None]
            parts.append(e)
        extra = torch.cat(parts) if parts else None

    half = dt != torch.float32
    o, S, _ = chunk_fwd(q, k, v, W, extra, table, C, float(scale), output_final_state, SAVE_STATES,
                        STATE_HALF and half, MIX_PREC_HALF if half else "ieee")
    if not output_final_state:
        return o, None

    finals_cs, finals_p = [], []
    for s, (first, nrows) in enumerate(per_seq):
        off = offsets[s]
        i0 = off // C
        end = off + seqs[s][1]
        i_end, p_end = divmod(end, C)
        if initial_state is not None:
            prev = initial_state.chunk_states[s, :, :i0].to(torch.float32)
            P0 = initial_state.partial[s].to(torch.float32)
        else:
            prev = S.new_zeros(H, 0, DK, DV)
            P0 = None
        mine = S[first : first + nrows].transpose(0, 1)  # [H, n, Dk, Dv]
        if P0 is not None and nrows:
            mine = torch.cat([(mine[:, :1] + P0[:, None]), mine[:, 1:]], dim=1)
        elif P0 is not None:
            mine = P0[:, None]  # no new tokens: the partial chunk stays as it was
        states = torch.cat([prev, mine], dim=1)  # chunks 0 .. (last touched)
        done = min(i_end, L)
        cs = torch.cat([states[:, :done], states.new_zeros(H, L - done, DK, DV)], dim=1)
        partial = states[:, i_end] if p_end else states.new_zeros(H, DK, DV)
        finals_cs.append(cs)
        finals_p.append(partial)
    end_offsets = tuple(off + n for (_, n), off in zip(seqs, offsets))
    final = MHLAState(torch.stack(finals_cs), torch.stack(finals_p), end_offsets, C)
    return o, final
