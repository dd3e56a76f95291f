"""Parallel (quadratic) path of non-causal MHLA: FlashAttention's loop without the softmax.

For short sequences the D x D block states cost more bytes than the tokens themselves (a state of
a 16-token block with D = 64 is 8x the block's keys), so this path never forms them. Token t of
block i and token u of block j interact through the score

    a_tu = W[i, j] s_tu,   s_tu = s q_t . k_u,      num_t = sum_u a_tu v_u,   o_t = num_t r_t

with r_t = 1 / (sum_u a_tu + eps) for the exact normaliser (the row sums of A are exactly
q'_t . z~_i), r_t = 1 / (p~_t + eps) for the reference one (p~ from a per-token pre-pass,
p_{j,w} = s q_{j,w} . z_j, then p~ = W p) and r_t = 1 without normalisation. Per query tile the
kernel loops over key tiles; W[block(t), block(u)] is gathered for the tile pair either
elementwise or as a one-hot product (W rows of the tile's query blocks times the key tiles'
block indicator), so every product runs on tensor cores. Cost 4 N^2 D per (batch, head).

Backward (o and r are saved; delta_t = dO_t . o_t):

    dA_tu = r_t (dO_t . v_u - delta_t)    (exact; reference and none drop delta_t)
    dS_tu = dA_tu W[i, j]        dq_t = s sum_u dS_tu k_u      dk_u = s sum_t dS_tu q_t
    dv_u = sum_t a_tu r_t dO_t   dW[i, j] = sum_b sum_{t in i, u in j} dA_tu s_tu

The reference normaliser adds c_t = -r_t delta_t = dL/dden_t: dp~ = c, dW += c p^T, dp = W^T c,
dq_{j,w} += s dp_{j,w} z_j, dk_u += s sum_w dp_{j,w} q_{j,w}. These O(N D) terms run in two small
kernels (`_ref_sums`: z and p; `_ref_grad`: dp, the dq and dk terms, dW += c p^T); the forward forms
p~ = W p itself, per query tile.

Kernels: `_par_fwd` (o, r), `_par_dq` (delta, dq), `_par_dkdv` (dk, dv and per-(b, h) dW
partials, block-summed by one-hot products and added atomically). Head dims that are not a power of
two are split into a power-of-two part and a tail tile (72 = 64 + 16 of which 8 are used), instead
of padding to the next power of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from mhla_core.ops.noncausal.launch import block_positions, rowmap_args
from mhla_core.ops.noncausal.launch import strides3 as _strides
from mhla_core.ops.triton_helpers import INTERPRET
from mhla_core.ops.triton_helpers import cast as _cast
from mhla_core.ops.triton_helpers import device_fn as _device_fn
from mhla_core.ops.triton_helpers import dot as _dot
from mhla_core.ops.triton_helpers import next_pow2 as _pow2
from mhla_core.ops.utils import cached_hash, config_getstate

W_GATHER, W_ONEHOT, W_SCALAR, W_ROW, W_BLOCKS, W_EXPAND, W_DENSE = 0, 1, 2, 3, 4, 5, 6
BLOCK_MODES = (W_BLOCKS, W_EXPAND)  # modes that need L (a power of two) to divide both tiles


# ------------------------------------------------------------------------------------------------
# device helpers


@_device_fn
def _rows(base, rows, mrow, s_t, D0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    """[len(rows), BD] tile of columns D0 .. D0 + BD of a token-major array, zero outside."""
    offs = D0 + tl.arange(0, BD)
    return tl.load(base + rows[:, None] * s_t + offs[None, :], mask=mrow[:, None] & (offs[None, :] < D), other=0.0)


@_device_fn
def _rows_t(base, rows, mrow, s_t, D0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    """The transpose of `_rows`: [BD, len(rows)]."""
    offs = D0 + tl.arange(0, BD)
    return tl.load(base + rows[None, :] * s_t + offs[:, None], mask=mrow[None, :] & (offs[:, None] < D), other=0.0)


@_device_fn
def _store_rows(base, rows, mrow, s_t, x, D0: tl.constexpr, BD: tl.constexpr, D: tl.constexpr):
    offs = D0 + tl.arange(0, BD)
    tl.store(base + rows[:, None] * s_t + offs[None, :], _cast(x, base.dtype.element_ty),
             mask=mrow[:, None] & (offs[None, :] < D))


@_device_fn
def _tail_rows(base, rows, mrow, s_t, T0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D: tl.constexpr):
    """The tail tile of a split head dim: columns T0 .. T0 + D2. T0 = D1 masks the columns past D at the
    load; T0 = D - D2 (the window mode) loads only real columns and zeroes those below D1 afterwards."""
    x = _rows(base, rows, mrow, s_t, T0, D2, D)
    if T0 < D1:
        offs = T0 + tl.arange(0, D2)
        x = tl.where(offs[None, :] >= D1, x, tl.zeros_like(x))
    return x


@_device_fn
def _tail_rows_t(base, rows, mrow, s_t, T0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D: tl.constexpr):
    """The transpose of `_tail_rows`: [D2, len(rows)]."""
    x = _rows_t(base, rows, mrow, s_t, T0, D2, D)
    if T0 < D1:
        offs = T0 + tl.arange(0, D2)
        x = tl.where(offs[:, None] >= D1, x, tl.zeros_like(x))
    return x


@_device_fn
def _rows2(base, rows, mrow, s_t, D1: tl.constexpr, D2: tl.constexpr, T0: tl.constexpr, D: tl.constexpr):
    """`_rows` of the main tile and of the tail tile of a split head dim (the main one again without a tail)."""
    x1 = _rows(base, rows, mrow, s_t, 0, D1, D)
    x2 = x1
    if D2 > 0:
        x2 = _tail_rows(base, rows, mrow, s_t, T0, D1, D2, D)
    return x1, x2


@_device_fn
def _rows2_t(base, rows, mrow, s_t, D1: tl.constexpr, D2: tl.constexpr, T0: tl.constexpr, D: tl.constexpr):
    """`_rows_t` of the main and the tail tile."""
    x1 = _rows_t(base, rows, mrow, s_t, 0, D1, D)
    x2 = x1
    if D2 > 0:
        x2 = _tail_rows_t(base, rows, mrow, s_t, T0, D1, D2, D)
    return x1, x2


@_device_fn
def _store_rows2(base, rows, mrow, s_t, x1, x2, D1: tl.constexpr, D2: tl.constexpr, T0: tl.constexpr,
                 D: tl.constexpr):
    """`_store_rows` of the main and the tail tile (of the tail only its columns from D1 on)."""
    _store_rows(base, rows, mrow, s_t, x1, 0, D1, D)
    if D2 > 0:
        offs = T0 + tl.arange(0, D2)
        tl.store(base + rows[:, None] * s_t + offs[None, :], _cast(x2, base.dtype.element_ty),
                 mask=mrow[:, None] & (offs[None, :] < D) & (offs[None, :] >= D1))


@_device_fn
def _positions(map_ptr, p0, end, BT: tl.constexpr, GRID: tl.constexpr):
    """(block-major positions p0 .. p0 + BT, their token rows, mask of real tokens before `end`).

    Without GRID the tokens are block-major (row = position). With GRID, map_ptr holds the
    row-major grid index of each position (-1 for a padding token, which is masked).
    """
    offs = p0 + tl.arange(0, BT)
    m = offs < end
    rows = offs
    if GRID:
        rows = tl.load(map_ptr + offs, mask=m, other=-1)
        m = m & (rows >= 0)
    return offs, rows, m


@_device_fn
def _mixed_positions(wb, x_ptr, offs, m, L, M, TRANS: tl.constexpr, JB: tl.constexpr):
    """[len(offs)] fp32: sum_j W[i, j] x[j L + w] for the positions offs = i L + w of one (b, h)
    (W^T with TRANS: sum_j W[j, i] x[j L + w]); x_ptr points at that (b, h)'s M L values."""
    i = offs // L
    w = offs % L
    acc = offs.to(tl.float32) * 0.0
    for j0 in range(0, M, JB):
        cj = j0 + tl.arange(0, JB)
        mm = m[:, None] & (cj[None, :] < M)
        if TRANS:
            wt = tl.load(wb + cj[None, :] * M + i[:, None], mask=mm, other=0.0)
        else:
            wt = tl.load(wb + i[:, None] * M + cj[None, :], mask=mm, other=0.0)
        acc += tl.sum(wt * tl.load(x_ptr + cj[None, :] * L + w[:, None], mask=mm, other=0.0), axis=1)
    return acc


@_device_fn
def _head_program(H):
    """(tile index, b * H + h, b, h) of this program; b and h as int64 for the pointer offsets."""
    bh = tl.program_id(1)
    return tl.program_id(0), bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@_device_fn
def _onehot(offs, L, b0, NB: tl.constexpr):
    """[len(offs), NB] fp32: 1 where block(offs) - b0 equals the column."""
    c = tl.arange(0, NB)
    return tl.where((offs // L - b0)[:, None] == c[None, :], 1.0, 0.0)


@_device_fn
def _mix_tile(wb, q0, offs_q, mq, k0, offs_k, mk, L, M,
              WMODE: tl.constexpr, NB: tl.constexpr, WPREC: tl.constexpr):
    """[BQ, BK] fp32 tile of W[block(t), block(u)] (zero for masked rows and columns)."""
    if WMODE == 2:  # the tile pair lies inside one block pair
        wg = tl.load(wb + (q0 // L) * M + k0 // L)
    elif WMODE == 3:  # the key tile lies inside one block: one W entry per query row
        wg = tl.load(wb + (offs_q // L) * M + k0 // L, mask=mq, other=0.0)[:, None]
    elif WMODE == 1:
        jk0 = k0 // L
        cj = jk0 + tl.arange(0, NB)
        wrow = tl.load(wb + (offs_q // L)[:, None] * M + cj[None, :],
                       mask=mq[:, None] & (cj[None, :] < M), other=0.0)
        wg = _dot(wrow, tl.trans(_onehot(offs_k, L, jk0, NB)), None, WPREC)
    else:
        wg = tl.load(wb + (offs_q // L)[:, None] * M + (offs_k // L)[None, :],
                     mask=mq[:, None] & mk[None, :], other=0.0)
    return wg


@_device_fn
def _w_blocks(wb, q0, k0, M, LB: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, TRANS: tl.constexpr):
    """The W entries of a block-aligned tile pair: [BQ / LB, BK / LB] (query blocks x key blocks),
    or its transpose [BK / LB, BQ / LB] with TRANS; zero past the last block."""
    ci = q0 // LB + tl.arange(0, BQ // LB)
    cj = k0 // LB + tl.arange(0, BK // LB)
    if TRANS:
        w = tl.load(wb + ci[None, :] * M + cj[:, None], mask=(ci[None, :] < M) & (cj[:, None] < M), other=0.0)
    else:
        w = tl.load(wb + ci[:, None] * M + cj[None, :], mask=(ci[:, None] < M) & (cj[None, :] < M), other=0.0)
    return w


@_device_fn
def _times_blocks(s, w, R: tl.constexpr, C: tl.constexpr, LB: tl.constexpr):
    """s [R, C] times W constant on its LB x LB sub-tiles (w: [R / LB, C / LB]), by a 4D view of s."""
    s4 = tl.reshape(s, (R // LB, LB, C // LB, LB))
    return tl.reshape(s4 * w[:, None, :, None], (R, C))


@_device_fn
def _expand_blocks(w, R: tl.constexpr, C: tl.constexpr, LB: tl.constexpr):
    """w [R / LB, C / LB] repeated over LB x LB sub-tiles: an [R, C] tile."""
    return tl.reshape(tl.broadcast_to(w[:, None, :, None], (R // LB, LB, C // LB, LB)), (R, C))


@_device_fn
def _block_sums(g, R: tl.constexpr, C: tl.constexpr, LB: tl.constexpr):
    """g [R, C] summed over its LB x LB sub-tiles: [R / LB, C / LB]."""
    return tl.sum(tl.sum(tl.reshape(g, (R // LB, LB, C // LB, LB)), axis=3), axis=1)


@_device_fn
def _times_w(s, wb, wx, q0, offs_q, mq, k0, offs_k, mk, L, M, N,
             WMODE: tl.constexpr, NB: tl.constexpr, WPREC: tl.constexpr, LB: tl.constexpr,
             BQ: tl.constexpr, BK: tl.constexpr):
    """s [BQ, BK] times W[block(t), block(u)]; wx: the token-pair W of the dense mode."""
    if WMODE == 4:
        y = _times_blocks(s, _w_blocks(wb, q0, k0, M, LB, BQ, BK, False), BQ, BK, LB)
    elif WMODE == 5:
        y = s * _expand_blocks(_w_blocks(wb, q0, k0, M, LB, BQ, BK, False), BQ, BK, LB)
    elif WMODE == 6:
        y = s * tl.load(wx + offs_q[:, None] * N + offs_k[None, :], mask=mq[:, None] & mk[None, :], other=0.0)
    else:
        y = s * _mix_tile(wb, q0, offs_q, mq, k0, offs_k, mk, L, M, WMODE, NB, WPREC)
    return y


@_device_fn
def _times_wt(x, wt, WMODE: tl.constexpr, R: tl.constexpr, C: tl.constexpr, LB: tl.constexpr):
    """x times the W tile of `_par_dkdv` (wt: a [R / LB, C / LB] block matrix in the blocks mode)."""
    if WMODE == 4:
        y = _times_blocks(x, wt, R, C, LB)
    else:
        y = x * wt
    return y


@_device_fn
def _scores(a1, a2, b1, b2, PREC: tl.constexpr, HAS2: tl.constexpr):
    """a1 b1 (+ a2 b2 for a split head dim), fp32."""
    s = _dot(a1, b1, None, PREC)
    if HAS2:
        s = _dot(a2, b2, s, PREC)
    return s


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _par_fwd_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, wx_ptr, p_ptr, o_ptr, r_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    sw_h, sx_h, H, N, L, M, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    DV1: tl.constexpr, DV2: tl.constexpr, DK2P: tl.constexpr, DV2P: tl.constexpr,
    DKT: tl.constexpr, DVT: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr, WMODE: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr, WPREC: tl.constexpr,
    GRID: tl.constexpr, JB: tl.constexpr, LB: tl.constexpr,
):
    """o and r of one query tile (program 0) of one (b, h) (program 1); N = M L block-major positions.
    For the reference normaliser p_ptr holds p [B * H, N] of `_ref_sums`; p~ = W p is formed here."""
    pq, bh, b, h = _head_program(H)
    qb = q_ptr + b * sq_b + h * sq_h
    kb = k_ptr + b * sk_b + h * sk_h
    vb = v_ptr + b * sv_b + h * sv_h
    wb = w_ptr + h * sw_h
    wx = wx_ptr + h * sx_h
    dt = q_ptr.dtype.element_ty
    q0 = pq * BQ
    offs_q, rows_q, mq = _positions(map_ptr, q0, N, BQ, GRID)
    q1, q2 = _rows2(qb, rows_q, mq, sq_t, DK1, DK2, DKT, DK)
    acc1 = tl.zeros([BQ, DV1], dtype=tl.float32)
    acc2 = tl.zeros([BQ, DV2P], dtype=tl.float32)
    den = tl.zeros([BQ], dtype=tl.float32)
    for k0 in range(0, N, BK):
        offs_k, rows_k, mk = _positions(map_ptr, k0, N, BK, GRID)
        kt1, kt2 = _rows2_t(kb, rows_k, mk, sk_t, DK1, DK2, DKT, DK)
        s = _scores(q1, q2, kt1, kt2, PREC, DK2 > 0)
        a = _times_w(s, wb, wx, q0, offs_q, mq, k0, offs_k, mk, L, M, N, WMODE, NB, WPREC, LB, BQ, BK) * scale
        if NORM == 1:
            den += tl.sum(a, axis=1)
        a_d = _cast(a, dt)
        acc1 = _dot(a_d, _rows(vb, rows_k, mk, sv_t, 0, DV1, DV), acc1, PREC)
        if DV2 > 0:
            acc2 = _dot(a_d, _tail_rows(vb, rows_k, mk, sv_t, DVT, DV1, DV2, DV), acc2, PREC)
    if NORM == 1:
        r = 1.0 / (den + eps)
    elif NORM == 2:
        pb = p_ptr + bh.to(tl.int64) * N
        r = 1.0 / (_mixed_positions(wb, pb, offs_q, offs_q < N, L, M, False, JB) + eps)
    else:
        r = tl.full([BQ], 1.0, tl.float32)
    ob = o_ptr + b * so_b + h * so_h
    _store_rows2(ob, rows_q, mq, so_t, acc1 * r[:, None], acc2 * r[:, None], DV1, DV2, DVT, DV)
    tl.store(r_ptr + bh.to(tl.int64) * N + offs_q, r, mask=offs_q < N)  # padding: finite r


@triton.jit
def _par_dq_kernel(
    k_ptr, v_ptr, w_ptr, wx_ptr, o_ptr, do_ptr, r_ptr, delta_ptr, dq_ptr, map_ptr,
    sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    sd_b, sd_t, sd_h, sdq_b, sdq_t, sdq_h,
    sw_h, sx_h, H, N, L, M, scale,
    DK: tl.constexpr, DV: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    DV1: tl.constexpr, DV2: tl.constexpr, DK2P: tl.constexpr, DV2P: tl.constexpr,
    DKT: tl.constexpr, DVT: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr, WMODE: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr, WPREC: tl.constexpr,
    GRID: tl.constexpr, LB: tl.constexpr,
):
    """delta = dO . o (stored for `_par_dkdv`) and dq of one query tile (dq needs no q: no softmax)."""
    pq, bh, b, h = _head_program(H)
    kb = k_ptr + b * sk_b + h * sk_h
    vb = v_ptr + b * sv_b + h * sv_h
    ob = o_ptr + b * so_b + h * so_h
    db = do_ptr + b * sd_b + h * sd_h
    wb = w_ptr + h * sw_h
    wx = wx_ptr + h * sx_h
    dt = k_ptr.dtype.element_ty
    q0 = pq * BQ
    offs_q, rows_q, mq = _positions(map_ptr, q0, N, BQ, GRID)
    do1, do2 = _rows2(db, rows_q, mq, sd_t, DV1, DV2, DVT, DV)
    rq = bh.to(tl.int64) * N + offs_q
    if NORM > 0:
        r = tl.load(r_ptr + rq, mask=mq, other=0.0)
        delta = tl.sum(do1.to(tl.float32) * _rows(ob, rows_q, mq, so_t, 0, DV1, DV).to(tl.float32), axis=1)
        if DV2 > 0:
            o2 = _tail_rows(ob, rows_q, mq, so_t, DVT, DV1, DV2, DV)
            delta += tl.sum(do2.to(tl.float32) * o2.to(tl.float32), axis=1)
        tl.store(delta_ptr + rq, delta, mask=offs_q < N)  # padding: delta 0
    dq1 = tl.zeros([BQ, DK1], dtype=tl.float32)
    dq2 = tl.zeros([BQ, DK2P], dtype=tl.float32)
    for k0 in range(0, N, BK):
        offs_k, rows_k, mk = _positions(map_ptr, k0, N, BK, GRID)
        kt1, kt2 = _rows2_t(kb, rows_k, mk, sk_t, DK1, DK2, DKT, DK)
        vt1, vt2 = _rows2_t(vb, rows_k, mk, sv_t, DV1, DV2, DVT, DV)
        dp = _scores(do1, do2, vt1, vt2, PREC, DV2 > 0)
        if NORM == 1:
            dp = (dp - delta[:, None]) * r[:, None]
        elif NORM == 2:
            dp = dp * r[:, None]
        ds = _cast(_times_w(dp, wb, wx, q0, offs_q, mq, k0, offs_k, mk, L, M, N, WMODE, NB, WPREC, LB, BQ, BK), dt)
        dq1 = _dot(ds, tl.trans(kt1), dq1, PREC)
        if DK2 > 0:
            dq2 = _dot(ds, tl.trans(kt2), dq2, PREC)
    dqb = dq_ptr + b * sdq_b + h * sdq_h
    _store_rows2(dqb, rows_q, mq, sdq_t, dq1 * scale, dq2 * scale, DK1, DK2, DKT, DK)


@triton.jit
def _par_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, wx_ptr, do_ptr, r_ptr, delta_ptr, dk_ptr, dv_ptr, dw_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h,
    sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    sw_h, sx_h, H, N, L, M, scale,
    DK: tl.constexpr, DV: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    DV1: tl.constexpr, DV2: tl.constexpr, DK2P: tl.constexpr, DV2P: tl.constexpr,
    DKT: tl.constexpr, DVT: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr, WMODE: tl.constexpr, NB: tl.constexpr, NBQ: tl.constexpr,
    PREC: tl.constexpr, WPREC: tl.constexpr, NEED_DW: tl.constexpr, GRID: tl.constexpr,
    LB: tl.constexpr, DWR: tl.constexpr,
):
    """dk, dv of one key tile and its (b, h) share of dW, in the transposed frame [key, query].
    DWR: block sums of dW by a 4D view of the tile (L = LB divides both tiles), else one-hot products."""
    pk, bh, b, h = _head_program(H)
    qb = q_ptr + b * sq_b + h * sq_h
    kb = k_ptr + b * sk_b + h * sk_h
    vb = v_ptr + b * sv_b + h * sv_h
    db = do_ptr + b * sd_b + h * sd_h
    wb = w_ptr + h * sw_h
    wx = wx_ptr + h * sx_h
    dwb = dw_ptr + bh.to(tl.int64) * M * M
    dt = q_ptr.dtype.element_ty
    k0 = pk * BK
    offs_k, rows_k, mk = _positions(map_ptr, k0, N, BK, GRID)
    k1, k2 = _rows2(kb, rows_k, mk, sk_t, DK1, DK2, DKT, DK)
    v1, v2 = _rows2(vb, rows_k, mk, sv_t, DV1, DV2, DVT, DV)
    jk0 = k0 // L
    if NEED_DW and WMODE != 2 and WMODE != 3 and not DWR:
        ek_t = tl.trans(_onehot(offs_k, L, jk0, NB))  # [NB, BK]
    dk1 = tl.zeros([BK, DK1], dtype=tl.float32)
    dk2 = tl.zeros([BK, DK2P], dtype=tl.float32)
    dv1 = tl.zeros([BK, DV1], dtype=tl.float32)
    dv2 = tl.zeros([BK, DV2P], dtype=tl.float32)
    for q0 in range(0, N, BQ):
        offs_q, rows_q, mq = _positions(map_ptr, q0, N, BQ, GRID)
        qt1, qt2 = _rows2_t(qb, rows_q, mq, sq_t, DK1, DK2, DKT, DK)
        st = _scores(k1, k2, qt1, qt2, PREC, DK2 > 0) * scale  # s_tu as [u, t]
        if WMODE == 2:
            wt = tl.load(wb + (q0 // L) * M + jk0)
        elif WMODE == 3:
            wt = tl.load(wb + (offs_q // L) * M + jk0, mask=mq, other=0.0)[None, :]
        elif WMODE == 4:  # [BK / L, BQ / L]: applied by `_times_blocks`
            wt = _w_blocks(wb, q0, k0, M, LB, BQ, BK, True)
        elif WMODE == 5:
            wt = _expand_blocks(_w_blocks(wb, q0, k0, M, LB, BQ, BK, True), BK, BQ, LB)
        elif WMODE == 6:
            wt = tl.load(wx + offs_q[None, :] * N + offs_k[:, None], mask=mk[:, None] & mq[None, :], other=0.0)
        else:
            wt = tl.trans(_mix_tile(wb, q0, offs_q, mq, k0, offs_k, mk, L, M, WMODE, NB, WPREC))
        dot1, dot2 = _rows2_t(db, rows_q, mq, sd_t, DV1, DV2, DVT, DV)
        dpt = _scores(v1, v2, dot1, dot2, PREC, DV2 > 0)  # dO_t . v_u as [u, t]
        rq = bh.to(tl.int64) * N + offs_q
        if NORM > 0:
            r = tl.load(r_ptr + rq, mask=mq, other=0.0)
            pt = _cast(_times_wt(st * r[None, :], wt, WMODE, BK, BQ, LB), dt)
            if NORM == 1:
                delta = tl.load(delta_ptr + rq, mask=mq, other=0.0)
                dpt = (dpt - delta[None, :]) * r[None, :]
            else:
                dpt = dpt * r[None, :]
        else:
            pt = _cast(_times_wt(st, wt, WMODE, BK, BQ, LB), dt)
        dv1 = _dot(pt, tl.trans(dot1), dv1, PREC)
        if DV2 > 0:
            dv2 = _dot(pt, tl.trans(dot2), dv2, PREC)
        dst = _cast(_times_wt(dpt, wt, WMODE, BK, BQ, LB), dt)
        dk1 = _dot(dst, tl.trans(qt1), dk1, PREC)
        if DK2 > 0:
            dk2 = _dot(dst, tl.trans(qt2), dk2, PREC)
        if NEED_DW:
            g = dpt * st  # dA_tu s_tu as [u, t]
            if WMODE == 2:
                tl.atomic_add(dwb + (q0 // L) * M + jk0, tl.sum(tl.sum(g, axis=1), axis=0))
            elif WMODE == 3:  # sum over the keys, then over the queries of each block (BQ = NBQ * L)
                gq = tl.sum(tl.reshape(tl.sum(g, axis=0), [NBQ, BQ // NBQ]), axis=1)
                ci = q0 // L + tl.arange(0, NBQ)
                tl.atomic_add(dwb + ci * M + jk0, gq, mask=ci < M)
            elif DWR:  # [BK / L, BQ / L] block sums of a block-aligned tile pair
                cj = jk0 + tl.arange(0, BK // LB)
                ci = q0 // LB + tl.arange(0, BQ // LB)
                tl.atomic_add(dwb + ci[None, :] * M + cj[:, None], _block_sums(g, BK, BQ, LB),
                              mask=(cj[:, None] < M) & (ci[None, :] < M))
            else:
                iq0 = q0 // L
                gk = _dot(ek_t, g, None, WPREC)  # [NB, BQ]: summed over the keys of each block
                gkq = _dot(gk, _onehot(offs_q, L, iq0, NBQ), None, WPREC)  # [NB (j), NBQ (i)]
                # only the block pairs the two tiles touch: NB, NBQ are padded to >= 16 for the
                # products, and adding their zeros cost most of this kernel's time at 16-token blocks
                cj = jk0 + tl.arange(0, NB)
                ci = iq0 + tl.arange(0, NBQ)
                j_end = tl.minimum(M, (tl.minimum(k0 + BK, N) - 1) // L + 1)
                i_end = tl.minimum(M, (tl.minimum(q0 + BQ, N) - 1) // L + 1)
                tl.atomic_add(dwb + ci[None, :] * M + cj[:, None], gkq,
                              mask=(cj[:, None] < j_end) & (ci[None, :] < i_end))
    dkb = dk_ptr + b * sdk_b + h * sdk_h
    dvb = dv_ptr + b * sdv_b + h * sdv_h
    _store_rows2(dkb, rows_k, mk, sdk_t, dk1 * scale, dk2 * scale, DK1, DK2, DKT, DK)
    _store_rows2(dvb, rows_k, mk, sdv_t, dv1, dv2, DV1, DV2, DVT, DV)


@triton.jit
def _ref_sums_kernel(
    q_ptr, k_ptr, map_ptr, z_ptr, p_ptr, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, H, N, L, M, scale,
    DK: tl.constexpr, BDK: tl.constexpr, BT: tl.constexpr, GRID: tl.constexpr,
):
    """Reference normaliser terms of block j (program 0): z_j = sum of its keys, p_{j,w} = s q_{j,w} . z_j."""
    j, bh, b, h = _head_program(H)
    qb = q_ptr + b * sq_b + h * sq_h
    kb = k_ptr + b * sk_b + h * sk_h
    start = j * L
    z = tl.zeros([BDK], dtype=tl.float32)
    for t0 in range(0, L, BT):
        _, rows, m = _positions(map_ptr, start + t0, start + L, BT, GRID)
        z += tl.sum(_rows(kb, rows, m, sk_t, 0, BDK, DK).to(tl.float32), axis=0)
    offs_d = tl.arange(0, BDK)
    tl.store(z_ptr + (bh * M + j).to(tl.int64) * DK + offs_d, z, mask=offs_d < DK)
    for t0 in range(0, L, BT):
        offs, rows, m = _positions(map_ptr, start + t0, start + L, BT, GRID)
        pw = tl.sum(_rows(qb, rows, m, sq_t, 0, BDK, DK).to(tl.float32) * z[None, :], axis=1) * scale
        tl.store(p_ptr + bh.to(tl.int64) * N + offs, pw, mask=offs < start + L)


@triton.jit
def _ref_grad_kernel(
    q_ptr, map_ptr, z_ptr, p_ptr, c_ptr, w_ptr, dq_ptr, dk_ptr, dw_ptr,
    sq_b, sq_t, sq_h, sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sw_h, H, N, L, M, scale,
    DK: tl.constexpr, BDK: tl.constexpr, BT: tl.constexpr, GRID: tl.constexpr, JB: tl.constexpr,
    NEED_DW: tl.constexpr,
):
    """The reference normaliser's gradient terms of block j, from c = dL/dp~ [B * H, N]:
    dp_j = (W^T c)_j, dq_{j,w} += s dp_{j,w} z_j and dk_u += s sum_w dp_{j,w} q_{j,w} in place, and
    dW[i, j] += sum_w c_{i,w} p_{j,w} into this (b, h)'s partial sums (column j: this program's alone)."""
    j, bh, b, h = _head_program(H)
    wb = w_ptr + h * sw_h
    cb = c_ptr + bh.to(tl.int64) * N
    qb = q_ptr + b * sq_b + h * sq_h
    dqb = dq_ptr + b * sdq_b + h * sdq_h
    dkb = dk_ptr + b * sdk_b + h * sdk_h
    start = j * L
    offs_d = tl.arange(0, BDK)
    z = tl.load(z_ptr + (bh * M + j).to(tl.int64) * DK + offs_d, mask=offs_d < DK, other=0.0)
    dz = tl.zeros([BDK], dtype=tl.float32)
    for t0 in range(0, L, BT):
        offs, rows, m = _positions(map_ptr, start + t0, start + L, BT, GRID)
        inb = offs < start + L
        dp = _mixed_positions(wb, cb, offs, inb, L, M, True, JB)
        if NEED_DW:  # dW[i, j] += sum_w c_{i,w} p_{j,w} for every i, JB blocks at a time
            pw = tl.load(p_ptr + bh.to(tl.int64) * N + offs, mask=inb, other=0.0)
            for i0 in range(0, M, JB):
                ci = i0 + tl.arange(0, JB)
                mm = inb[:, None] & (ci[None, :] < M)
                cw = tl.load(cb + ci[None, :] * L + (offs % L)[:, None], mask=mm, other=0.0)
                dwp = dw_ptr + (bh * M + ci).to(tl.int64) * M + j
                tl.store(dwp, tl.load(dwp, mask=ci < M, other=0.0) + tl.sum(cw * pw[:, None], axis=0),
                         mask=ci < M)
        dz += tl.sum(_rows(qb, rows, m, sq_t, 0, BDK, DK).to(tl.float32) * dp[:, None], axis=0)
        dqt = _rows(dqb, rows, m, sdq_t, 0, BDK, DK).to(tl.float32) + (scale * dp)[:, None] * z[None, :]
        _store_rows(dqb, rows, m, sdq_t, dqt, 0, BDK, DK)
    for t0 in range(0, L, BT):
        _, rows, m = _positions(map_ptr, start + t0, start + L, BT, GRID)
        dkt = _rows(dkb, rows, m, sdk_t, 0, BDK, DK).to(tl.float32) + scale * dz[None, :]
        _store_rows(dkb, rows, m, sdk_t, dkt, 0, BDK, DK)


# ------------------------------------------------------------------------------------------------
# launchers


def split_dim(d: int, min_tail: int = 16) -> tuple[int, int]:
    """A head dim as a power-of-two tile plus a tail tile of at least min_tail (0 when none):
    72 -> (64, 16), 96 -> (64, 32); 72 -> (64, 32) with min_tail 32."""
    if d <= 16:
        return 16, 0
    d1 = 1 << (d.bit_length() - 1)
    if d1 == d:
        return d, 0
    tail = max(_pow2(d - d1), min_tail)
    if tail >= d1:  # the split saves nothing
        return 2 * d1, 0
    return d1, tail


def _blocks_in_window(width: int, L: int) -> int:
    """Most blocks of L tokens that `width` consecutive tokens starting at a multiple of width touch."""
    if width % L == 0:
        return width // L
    if L % width == 0:
        return 1
    return -(-(width - 1) // L) + 1


W_MODES = ("auto", "row", "gather", "onehot", "blocks", "expand", "dense")
DW_MODES = ("auto", "onehot", "reshape")


@dataclass(frozen=True)
class ParallelTiles:
    """Tile sizes and launch settings of the parallel path (one set per kernel)."""

    __hash__ = cached_hash
    __getstate__ = config_getstate

    fwd_bq: int = 64
    fwd_bk: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_bq: int = 64
    dq_bk: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dkdv_bq: int = 64
    dkdv_bk: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    # W[block(t), block(u)] of a tile pair. "blocks": the [BQ / L, BK / L] W entries of the pair applied
    # to a 4D view of the score tile, where L is a power of two dividing both tiles (else "onehot");
    # "expand": the same entries broadcast to a [BQ, BK] tile (same SASS counts, same speed);
    # "onehot": W rows times a block indicator (a tf32 product); "row": one W entry per query row with
    # key tiles shrunk to one block; "gather": elementwise loads; "dense": a token-pair copy of W
    # ([N, N] per W head, built per call) loaded like an operand tile. A scalar whenever a tile pair
    # lies inside one block pair. "auto": "blocks" where the tiles are block-aligned, else "onehot"
    # ("gather" beyond 32 blocks per tile). H200, GPU ms of one fwd+bwd, DeiT-T / DiT-XL/2 256:
    # blocks 0.133 / 0.569, onehot 0.209 / 0.807, dense 0.196 / 0.702 (docs/kernels.md)
    w_mode: str = "auto"
    # dW's block sums in `_par_dkdv`: "reshape" (a 4D view of the tile, where the tiles are block-aligned,
    # else one-hot), "onehot" (two one-hot products per tile pair); "auto" = "reshape"
    dw_mode: str = "auto"
    # head dims as a power of two plus a tail tile (72 = 64 + 16); off by default: on the H200 with
    # triton 3.6 the split kernels gave NaN and illegal addresses at D = 72 (docs/kernels.md)
    split_dims: bool = False
    # where the tail tile of a split head dim sits: "mask" (from column D1, columns past D masked at the
    # load) or "window" (its last column is D - 1, columns below D1 zeroed after an unmasked load)
    split_tail: str = "mask"
    split_min_tail: int = 16  # the narrowest tail tile (16 or 32)

    def __post_init__(self) -> None:
        if self.split_tail not in ("mask", "window"):
            raise ValueError(f"split_tail must be 'mask' or 'window', got {self.split_tail!r}")
        if self.split_min_tail not in (16, 32):
            raise ValueError(f"split_min_tail must be 16 or 32, got {self.split_min_tail}")
        if self.w_mode not in W_MODES:
            raise ValueError(f"w_mode must be one of {W_MODES}, got {self.w_mode!r}")
        if self.dw_mode not in DW_MODES:
            raise ValueError(f"dw_mode must be one of {DW_MODES}, got {self.dw_mode!r}")
        for name in ("fwd_bq", "fwd_bk", "dq_bq", "dq_bk", "dkdv_bq", "dkdv_bk"):
            x = getattr(self, name)
            if x < 16 or x & (x - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {x}")


INTERPRET_TILES = ParallelTiles(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)


def default_tiles() -> ParallelTiles:
    """The GPU defaults; small tiles under the Triton interpreter (CPU tests)."""
    return INTERPRET_TILES if INTERPRET else ParallelTiles()


def block_aligned(bq: int, bk: int, L: int) -> bool:
    """Whether blocks of L tokens tile both a bq and a bk tile (L a power of two dividing both)."""
    return L & (L - 1) == 0 and bq % L == 0 and bk % L == 0


def _w_mode(tiles: ParallelTiles, bq: int, bk: int, L: int) -> tuple[int, int]:
    """(WMODE, NB) for a tile pair of bq queries and bk keys."""
    if L % bq == 0 and L % bk == 0:
        return W_SCALAR, 16
    if L % bk == 0 and bq % L == 0 and tiles.w_mode == "row":
        return W_ROW, 16
    nb = _pow2(_blocks_in_window(bk, L))
    if tiles.w_mode in ("auto", "blocks", "expand") and block_aligned(bq, bk, L):
        return (W_EXPAND if tiles.w_mode == "expand" else W_BLOCKS), nb
    if tiles.w_mode == "dense":
        return W_DENSE, nb
    if tiles.w_mode == "gather" or (tiles.w_mode == "auto" and nb > 32):
        return W_GATHER, nb
    return W_ONEHOT, nb


def _block_consts(tiles: ParallelTiles, bq: int, bk: int, L: int, wmode: int, need_dw: bool = False) -> dict:
    """LB (L where the kernels take 4D views of block-aligned tiles, else 1) and DWR (dW by block sums)."""
    aligned = block_aligned(bq, bk, L) and wmode not in (W_SCALAR, W_ROW)
    dwr = need_dw and aligned and tiles.dw_mode in ("auto", "reshape")
    return dict(LB=L if aligned else 1, DWR=dwr)


def dense_mixing(w3: torch.Tensor, sw_h: int, L: int, n: int) -> tuple[torch.Tensor, int]:
    """(W of every token pair, [n, n] or [Hw, n, n] fp32 like w3, its head stride): W[block(t), block(u)]
    at [t, u]."""
    wx = w3.repeat_interleave(L, dim=-2).repeat_interleave(L, dim=-1)[..., :n, :n].contiguous()
    return wx, (wx.stride(0) if sw_h and wx.dim() == 3 else 0)


def _tiles_for(tiles: ParallelTiles, bq: int, bk: int, N: int, L: int) -> tuple[int, int, int, int]:
    """(BQ, BK, WMODE, NB) of one kernel: tiles clipped to N; the row mode shrinks the key tile to
    the largest power of two that divides L (16-token blocks: 16 keys a tile)."""
    bq, bk = min(bq, _pow2(N)), min(bk, _pow2(N))
    if tiles.w_mode == "row" and L % bk and (L & -L) >= 16 and bq % L == 0:
        bk = L & -L
    wmode, nb = _w_mode(tiles, bq, bk, L)
    return bq, bk, wmode, nb


def dim_tiles(d: int, split: bool, min_tail: int = 16) -> tuple[int, int]:
    """(main tile, tail tile) of a head dim: `split_dim` when splitting, else the padded power of two."""
    return split_dim(d, min_tail) if split else (_pow2(d), 0)


def _dim_consts(d: int, tiles: ParallelTiles) -> tuple[int, int, int]:
    """(main tile, tail tile, first column of the tail tile) of a head dim."""
    d1, d2 = dim_tiles(d, tiles.split_dims, tiles.split_min_tail)
    return d1, d2, (d - d2 if d2 and tiles.split_tail == "window" else d1)


def _grid_args(rowmap: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(map pointer, N block-major positions, GRID) for block-major tokens or a grid layout's row map."""
    mp, grid = rowmap_args(rowmap, q)
    return mp, block_positions(q, rowmap), grid


def _mix_chunk(M: int) -> int:
    """Blocks per step of the in-kernel mixing of per-position terms (`_mixed_positions`)."""
    return min(64, _pow2(M))


def _ref_launch(q, rowmap, L: int, M: int) -> dict:
    DK = q.shape[-1]
    return dict(DK=DK, BDK=_pow2(DK), BT=min(64, _pow2(L)), GRID=rowmap is not None,
                num_warps=4, num_stages=1)


def reference_sums(q, k, L: int, scale: float, rowmap=None):
    """(p [B * H, N], z [B * H, M, Dk]) of the reference normaliser, fp32: z_j the key sum of block j,
    p_{j,w} = s q_{j,w} . z_j; N = M L block-major positions (padding included)."""
    B, _, H, DK = q.shape
    mp, N, _ = _grid_args(rowmap, q)
    M = N // L
    z = torch.empty((B * H, M, DK), dtype=torch.float32, device=q.device)
    p = torch.empty((B * H, N), dtype=torch.float32, device=q.device)
    _ref_sums_kernel[(M, B * H)](q, k, mp, z, p, *_strides(q), *_strides(k), H, N, L, M, scale,
                                 **_ref_launch(q, rowmap, L, M))
    return p, z


@lru_cache(maxsize=1024)
def _launch_consts(kernel: str, tiles: ParallelTiles, N: int, L: int, DK: int, DV: int, dtype: torch.dtype,
                   norm: int, grid: bool, need_dw: bool = False) -> tuple[int, int, dict]:
    """(tokens per program, WMODE, constexprs and launch options) of one parallel kernel at one shape;
    cached, so that a call does no more host work than its strides and its launch."""
    bq, bk = getattr(tiles, kernel + "_bq"), getattr(tiles, kernel + "_bk")
    bq, bk, wmode, nb = _tiles_for(tiles, bq, bk, N, L)
    if kernel == "dkdv" and wmode == W_GATHER:  # the block sums of dW use the one-hot products
        wmode = W_ONEHOT if need_dw else W_GATHER
    fp32 = dtype == torch.float32
    dk1, dk2, dkt = _dim_consts(DK, tiles)
    dv1, dv2, dvt = _dim_consts(DV, tiles)
    consts = dict(DK=DK, DV=DV, DK1=dk1, DK2=dk2, DV1=dv1, DV2=dv2, DK2P=max(dk2, 16), DV2P=max(dv2, 16),
                  DKT=dkt, DVT=dvt,
                  BQ=bq, BK=bk, NORM=norm, WMODE=wmode, NB=nb, PREC="ieee" if fp32 else "tf32",
                  WPREC="ieee" if fp32 else "tf32", GRID=grid,
                  num_warps=getattr(tiles, kernel + "_warps"), num_stages=getattr(tiles, kernel + "_stages"))
    block = _block_consts(tiles, bq, bk, L, wmode, need_dw)
    if kernel == "fwd":
        consts.update(JB=_mix_chunk(N // L), LB=block["LB"])
    elif kernel == "dq":
        consts.update(LB=block["LB"])
    else:
        consts.update(NBQ=bq // L if wmode == W_ROW else _pow2(_blocks_in_window(bq, L)), NEED_DW=need_dw, **block)
    return (bk if kernel == "dkdv" else bq), wmode, consts


def forward(q, k, v, w3, sw_h: int, L: int, norm: int, eps: float, scale: float,
            tiles: ParallelTiles, rowmap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, N, H, Dv] in v.dtype, r [B * H, M L] fp32: 1 / denominator, ones when norm == 0).

    rowmap: None for block-major tokens, else the int32 [M L] row-major grid index of each
    block-major position (-1 for padding, `BlockLayout.token_index`): tokens stay in grid order.
    """
    B, _, H, DK = q.shape
    mp, N, grid = _grid_args(rowmap, q)
    o = torch.empty_like(v)
    r = torch.empty((B * H, N), dtype=torch.float32, device=q.device)
    p = reference_sums(q, k, L, scale, rowmap)[0] if norm == 2 else r
    tile, wmode, consts = _launch_consts("fwd", tiles, N, L, DK, v.shape[-1], q.dtype, norm, grid)
    wx, sx_h = dense_mixing(w3, sw_h, L, N) if wmode == W_DENSE else (w3, 0)
    _par_fwd_kernel[(-(-N // tile), B * H)](
        q, k, v, w3, wx, p, o, r, mp, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        sw_h, sx_h, H, N, L, N // L, scale, eps, **consts,
    )
    return o, r


def backward(do, q, k, v, w3, sw_h: int, o, r, L: int, norm: int, eps: float, scale: float,
             need_dw: bool, tiles: ParallelTiles, rowmap=None):
    """(dq, dk, dv, dW [Hw, M, M] fp32 or None) from the saved o and r of `forward`."""
    B, _, H, DK = q.shape
    DV = v.shape[-1]
    mp, N, grid = _grid_args(rowmap, q)
    M = N // L
    BH = B * H
    delta = torch.empty((BH, N) if norm else (0,), dtype=torch.float32, device=q.device)
    rr = r if norm else delta
    dq = torch.empty_like(q)
    tile, wmode, consts = _launch_consts("dq", tiles, N, L, DK, DV, q.dtype, norm, grid)
    wx, sx_h = dense_mixing(w3, sw_h, L, N) if tiles.w_mode == "dense" else (w3, 0)
    _par_dq_kernel[(-(-N // tile), BH)](
        k, v, w3, wx, o, do, rr, delta, dq, mp, *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], sw_h, sx_h, H, N, L, M, scale, **consts,
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dwp = torch.zeros((BH, M, M) if need_dw else (1,), dtype=torch.float32, device=q.device)
    tile, wmode, consts = _launch_consts("dkdv", tiles, N, L, DK, DV, q.dtype, norm, grid, need_dw)
    _par_dkdv_kernel[(-(-N // tile), BH)](
        q, k, v, w3, wx, do, rr, delta, dk, dv, dwp, mp, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], sw_h, sx_h, H, N, L, M, scale, **consts,
    )
    if norm == 2:
        _reference_terms(q, k, w3, sw_h, r, delta, dq, dk, dwp, need_dw, L, scale, rowmap)
    dw = None
    if need_dw:  # per-(b, h) partials summed over the batch (and the heads for a shared W)
        dw = dwp.view(BH, M, M).sum(dim=0, keepdim=True) if sw_h == 0 else dwp.view(B, H, M, M).sum(dim=0)
    return dq, dk, dv, dw


def _reference_terms(q, k, w3, sw_h, r, delta, dq, dk, dwp, need_dw, L, scale, rowmap):
    """Add the reference normaliser's gradient through p~ = W p to dq, dk (in place) and the per-(b, h)
    dW partials dwp (in place)."""
    B, _, H, _ = q.shape
    mp, N, _ = _grid_args(rowmap, q)
    M = N // L
    p, z = reference_sums(q, k, L, scale, rowmap)
    c = -(delta * r)  # dL/dp~, [B * H, N]
    _ref_grad_kernel[(M, B * H)](q, mp, z, p, c, w3, dq, dk, dwp, *_strides(q), *_strides(dq), *_strides(dk),
                                 sw_h, H, N, L, M, scale, JB=_mix_chunk(M), NEED_DW=need_dw,
                                 **_ref_launch(q, rowmap, L, M))
