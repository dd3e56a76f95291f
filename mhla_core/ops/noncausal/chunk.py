"""The block-state ("chunk") path of non-causal MHLA (docs/spec.md section 1): kernels and launchers.

Notation: s = scale, q' = s q, blocks i (query side) and j (key side) of L tokens, W [M, M] per head.
A block's *state row* is the vector X_j = [S_j (Dk*Dv) | z_j (Dk) | p_j (L)] (fp32; with
`StateConfig.state_dtype="bfloat16"` X and the forward's X~ are bf16, the backward's X~ and the state
gradients fp32, and its X too for the exact normaliser), where
S_j = K_j^T V_j, z_j = K_j^T 1 and p_{j,w} = q'_{j,w} . z_j. The z part exists when normalize=True,
the p part only for normalizer="reference". One GEMM over blocks mixes every part at once:
X~ = W X, i.e. S~_i, z~_i and p~_i = sum_j W[i,j] p_j (the reference denominator minus eps).

Forward, token t of block i (den = 1 when normalize=False):

    exact:     den_t = q'_t . z~_i + eps       reference: den_{i,w} = p~_{i,w} + eps
    o_t = (q'_t S~_i) / den_t

Backward (only q, k, v and W are saved; num_t = q'_t S~_i is recomputed, which is cheaper than
reading a saved o and more accurate than a rounded one):

    g_t  = dO_t / den_t                        c_t = -(dO_t . num_t) / den_t^2   (= dL/dden_t)
    dS~_i = sum_t q'_t g_t^T                   dz~_i = sum_t c_t q'_t            (exact)
    dq_t  = s (S~_i g_t + c_t z~_i)            dp~_{i,w} = c_{i,w}               (reference)
    dX~_i = [dS~_i | dz~_i | c_i]  (dz~ = 0 for "reference")
    dX   = W^T dX~                             dW = sum_b dX~ X^T   (= <dS~_i,S_j> + <dz~_i,z_j> + <c_i,p_j>)
    reference only: dz_j += s Q_j^T dp_j,      dq_{j,w} += s dp_{j,w} z_j
    dk_t = dS_j v_t + dz_j                     dv_t = dS_j^T k_t

With the exact normaliser and positive q, k the two terms of dq nearly cancel, so there, for half
inputs, the products with S~ in the backward (num and dq) take fp32 operands (tf32 dots,
`StateConfig.bwd_tf32_half`) and the backward recomputes X in fp32; the rest uses input-dtype operands.

Two paths:
  * "state" (any size): kernel `_state` writes X, `_mix` forms X~ (in place when one program column
    covers all M rows), `_out` writes o. Backward recomputes X and X~, `_bwd_q` writes dX~ (in place
    over X~) and dq, `_dw` reduces dW, `_mix` forms dX = W^T dX~ in place, `_bwd_kv` writes dk, dv.
    Three launches forward, six backward. (A split of `_bwd_q` into a dq kernel and a dX~ kernel was
    measured slower on the H200, 2026-12-02, and removed: docs/kernels.md.)
  * "direct" (small M, L and head dims: `StateConfig.direct_max_*`): each query-block program forms
    S~_i = sum_j W[i,j] S_j from k, v itself, so the forward is one launch and no state touches HBM;
    the backward is two launches (`_bwd_q` direct, then `_bwd_kv` direct, which also forms
    dX_j = sum_i W[i,j] dX~_i and column j of dW). Work grows like M^2 L D^2, hence the size limits.

Dot operands are the input dtype (fp32 states are cast for half inputs) unless said otherwise,
accumulation is fp32; fp32 inputs use exact fp32 dots; the mixing GEMMs of half inputs use tf32 (by default).
Head dims need not be powers of two (masked loads); Dv is tiled by BLOCK_DV and program 0 of a
block does the cross-tile work (dq, dk) when there are several tiles.

Every setting (launch tiles, warps and stages, Dv tiling, the direct variant's limits and cost model, the
mixing implementation and precision, a forced variant) is a field of the frozen `StateConfig`
(state_config.py), which `triton_ops` passes from `NoncausalConfig.state` to `forward` / `backward`;
`make_plan` caches one `Plan` per (shapes, dtype, L, M, norm, config). There are no module-level knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mhla_core.ops.noncausal.launch import launch as _launch
from mhla_core.ops.noncausal.launch import rowmap_args as _grid_args
from mhla_core.ops.noncausal.launch import strides3 as _strides
from mhla_core.ops.noncausal.mix import _dw_partials, _mix, _mixing3
from mhla_core.ops.noncausal.state_config import StateConfig
from mhla_core.ops.triton_helpers import cast as _cast
from mhla_core.ops.triton_helpers import cdiv as _cdiv
from mhla_core.ops.triton_helpers import device_fn as _device_fn
from mhla_core.ops.triton_helpers import dot as _dot
from mhla_core.ops.triton_helpers import next_pow2 as _pow2

NORM_NONE, NORM_EXACT, NORM_REFERENCE = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# helpers


@_device_fn
def _block_ptr(ptr, b, h, blk, L, s_b, s_t, s_h, GRID: tl.constexpr):
    """Pointer to token 0 of block `blk`, batch b, head h (64-bit offsets); with GRID the (b, h)
    base only, as `_block_rows` then gives absolute token rows."""
    base = ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    if not GRID:
        base += (blk * L).to(tl.int64) * s_t
    return base


@_device_fn
def _block_rows(map_ptr, blk, tt, mt, L, GRID: tl.constexpr):
    """(token rows, mask) of in-block positions tt of block `blk`, for pointers from `_block_ptr`.

    Without GRID tokens are block-major (rows tt from the block's first token). With GRID, map_ptr
    holds the row-major grid index of each block-major position (-1 for padding, which is masked).
    """
    rows = tt
    mrow = mt
    if GRID:
        rows = tl.load(map_ptr + blk * L + tt, mask=mt, other=-1)
        mrow = mt & (rows >= 0)
    return rows, mrow


@_device_fn
def _tile(base, tt, mt, s_t, offs_d, md):
    """[BLOCK_T, BLOCK_D] tile of a [*, D] row-major token array, zero outside the masks."""
    return tl.load(base + tt[:, None] * s_t + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)


@_device_fn
def _direct_mixed(
    q_ptr, k_ptr, v_ptr, w_ptr, map_ptr, b, h, i, L, M, sw_h, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    offs_k, mk, offs_v, mv,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    NORM: tl.constexpr, PREC: tl.constexpr, GRID: tl.constexpr,
):
    """S~_i tile, z~_i and p~_i (per in-block position) of query block i, from k, v (and q) directly."""
    offs_t = tl.arange(0, BLOCK_T)
    mt = offs_t < L
    s_acc = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
    p_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    w_row = w_ptr + h * sw_h + i * M
    for j in range(0, M):
        wij = tl.load(w_row + j)
        rj, mrj = _block_rows(map_ptr, j, offs_t, mt, L, GRID)
        kt = _tile(_block_ptr(k_ptr, b, h, j, L, sk_b, sk_t, sk_h, GRID), rj, mrj, sk_t, offs_k, mk)
        vt = _tile(_block_ptr(v_ptr, b, h, j, L, sv_b, sv_t, sv_h, GRID), rj, mrj, sv_t, offs_v, mv)
        vw = _cast((vt.to(tl.float32) * wij), kt.dtype)
        s_acc = _dot(tl.trans(kt), vw, s_acc, PREC)
        if NORM > 0:
            zj = tl.sum(kt.to(tl.float32), axis=0)
            z_acc += wij * zj
            if NORM == 2:
                qt = _tile(_block_ptr(q_ptr, b, h, j, L, sq_b, sq_t, sq_h, GRID), rj, mrj, sq_t, offs_k, mk)
                p_acc += wij * (tl.sum(qt.to(tl.float32) * zj[None, :], axis=1) * scale)
    return s_acc, z_acc, p_acc


@_device_fn
def _mixed_state(
    q_ptr, k_ptr, v_ptr, w_ptr, map_ptr, row, b, h, i, L, M, sw_h, scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    offs_k, mk, offs_v, mv,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    NORM: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr, GRID: tl.constexpr,
):
    """(S~_i tile, z~_i, p~_i) of query block i: formed from k, v on the direct path, else S~ and z~ read
    from the state row `row` (p~ is read per token by the callers; z~ only for the exact normaliser)."""
    if DIRECT:
        s_m, z_m, p_m = _direct_mixed(
            q_ptr, k_ptr, v_ptr, w_ptr, map_ptr, b, h, i, L, M, sw_h, scale,
            sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
            offs_k, mk, offs_v, mv, BLOCK_DK, BLOCK_DV, BLOCK_T, NORM, PREC, GRID,
        )
    else:
        s_m = tl.load(row + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        z_m = tl.zeros([BLOCK_DK], dtype=tl.float32)
        if NORM == 1:
            z_m = tl.load(row + DK * DV + offs_k, mask=mk, other=0.0).to(tl.float32)
        p_m = tl.zeros([BLOCK_T], dtype=tl.float32)
    return s_m, z_m, p_m


@_device_fn
def _program_tiles(
    H, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The (block, Dv tile, b * H + h) program's indices, b, h, token / Dk / Dv offsets and the Dk, Dv masks."""
    blk = tl.program_id(0)
    jv = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_DK)
    mk = offs_k < DK
    offs_v = jv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mv = offs_v < DV
    return blk, jv, bh, b, h, offs_t, offs_k, mk, offs_v, mv


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _state_kernel(
    q_ptr, k_ptr, v_ptr, x_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    H, L, M, RS, scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr, GRID: tl.constexpr,
):
    """X_j = [K_j^T V_j | K_j^T 1 | s Q_j K_j^T 1] for block j = program 0, Dv tile = program 1."""
    j, jv, bh, b, h, offs_t, offs_k, mk, offs_v, mv = _program_tiles(H, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T)
    kb = _block_ptr(k_ptr, b, h, j, L, sk_b, sk_t, sk_h, GRID)
    vb = _block_ptr(v_ptr, b, h, j, L, sv_b, sv_t, sv_h, GRID)
    s_acc = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    z_acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < L
        rr, mr = _block_rows(map_ptr, j, tt, mt, L, GRID)
        kt = _tile(kb, rr, mr, sk_t, offs_k, mk)
        vt = _tile(vb, rr, mr, sv_t, offs_v, mv)
        s_acc = _dot(tl.trans(kt), vt, s_acc, PREC)
        if NORM > 0:
            z_acc += tl.sum(kt.to(tl.float32), axis=0)
    row = x_ptr + (bh * M + j).to(tl.int64) * RS
    xdt = x_ptr.dtype.element_ty
    tl.store(row + offs_k[:, None] * DV + offs_v[None, :], _cast(s_acc, xdt), mask=mk[:, None] & mv[None, :])
    if NORM > 0:
        if jv == 0:
            tl.store(row + DK * DV + offs_k, _cast(z_acc, xdt), mask=mk)
            if NORM == 2:
                qb = _block_ptr(q_ptr, b, h, j, L, sq_b, sq_t, sq_h, GRID)
                for t0 in range(0, L, BLOCK_T):
                    tt = t0 + offs_t
                    mt = tt < L
                    rr, mr = _block_rows(map_ptr, j, tt, mt, L, GRID)
                    qt = _tile(qb, rr, mr, sq_t, offs_k, mk)
                    p = tl.sum(qt.to(tl.float32) * z_acc[None, :], axis=1) * scale
                    tl.store(row + DK * DV + DK + tt, _cast(p, xdt), mask=mt)




@triton.jit
def _out_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, x_ptr, o_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    sw_h, H, L, M, RS, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr, SF32: tl.constexpr,
    GRID: tl.constexpr,
):
    """o of query block i (program 0), Dv tile program 1: (q' S~_i) / den."""
    i, jv, bh, b, h, offs_t, offs_k, mk, offs_v, mv = _program_tiles(H, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T)
    row = x_ptr + (bh * M + i).to(tl.int64) * RS
    s_m, z_m, p_m = _mixed_state(
        q_ptr, k_ptr, v_ptr, w_ptr, map_ptr, row, b, h, i, L, M, sw_h, scale,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
        offs_k, mk, offs_v, mv, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T, NORM, DIRECT, PREC, GRID,
    )
    qb = _block_ptr(q_ptr, b, h, i, L, sq_b, sq_t, sq_h, GRID)
    ob = _block_ptr(o_ptr, b, h, i, L, so_b, so_t, so_h, GRID)
    if SF32:  # fp16 inputs: keep the state in fp32 (its entries may exceed the fp16 range)
        sdt = tl.float32
    else:
        sdt = q_ptr.dtype.element_ty
    s_d = _cast(s_m, sdt)
    for t0 in range(0, L, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < L
        rr, mr = _block_rows(map_ptr, i, tt, mt, L, GRID)
        qt = _tile(qb, rr, mr, sq_t, offs_k, mk)
        num = _dot(_cast(qt, sdt), s_d, None, PREC) * scale
        if NORM == 1:
            den = tl.sum(qt.to(tl.float32) * z_m[None, :], axis=1) * scale + eps
            num = num / den[:, None]
        elif NORM == 2:
            if DIRECT:
                den = p_m + eps
            else:
                den = tl.load(row + DK * DV + DK + tt, mask=mt, other=1.0).to(tl.float32) + eps
            num = num / den[:, None]
        tl.store(ob + rr[:, None] * so_t + offs_v[None, :], _cast(num, o_ptr.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])


@triton.jit
def _bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, x_ptr, dx_ptr, dq_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    sd_b, sd_t, sd_h, sdq_b, sdq_t, sdq_h,
    sw_h, H, L, M, RS, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
    NUM_DV_TILES: tl.constexpr, INPLACE: tl.constexpr, HP: tl.constexpr, HP_PREC: tl.constexpr,
    GRID: tl.constexpr,
):
    """dX~_i = [dS~_i | dz~_i | c_i] and dq (minus the reference term) of query block i.

    The products with S~ (the recomputed numerator and dq) use fp32 operands (tf32 dots) when HP:
    dq is a difference of two close terms for positive q, k, and bf16 operands would cost accuracy.
    """
    i, jv, bh, b, h, offs_t, offs_k, mk, offs_v, mv = _program_tiles(H, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T)
    row = x_ptr + (bh * M + i).to(tl.int64) * RS
    drow = dx_ptr + (bh * M + i).to(tl.int64) * RS
    s_m, z_m, p_m = _mixed_state(
        q_ptr, k_ptr, v_ptr, w_ptr, map_ptr, row, b, h, i, L, M, sw_h, scale,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
        offs_k, mk, offs_v, mv, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T, NORM, DIRECT, PREC, GRID,
    )
    dt = q_ptr.dtype.element_ty
    xdt = dx_ptr.dtype.element_ty
    if HP:
        sdt = tl.float32
    else:
        sdt = dt
    s_op = _cast(s_m, sdt)
    qb = _block_ptr(q_ptr, b, h, i, L, sq_b, sq_t, sq_h, GRID)
    db = _block_ptr(do_ptr, b, h, i, L, sd_b, sd_t, sd_h, GRID)
    dqb = _block_ptr(dq_ptr, b, h, i, L, sdq_b, sdq_t, sdq_h, GRID)
    ds_acc = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
    dz_acc = tl.zeros([BLOCK_DK], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < L
        rr, mr = _block_rows(map_ptr, i, tt, mt, L, GRID)
        qt = _tile(qb, rr, mr, sq_t, offs_k, mk)
        q_op = _cast(qt, sdt)
        dot_ = _tile(db, rr, mr, sd_t, offs_v, mv).to(tl.float32)
        if NORM > 0:
            if NORM == 1:
                den = tl.sum(qt.to(tl.float32) * z_m[None, :], axis=1) * scale + eps
            elif DIRECT:
                den = p_m + eps
            else:
                den = tl.load(row + DK * DV + DK + tt, mask=mt, other=1.0).to(tl.float32) + eps
            # c = dL/dden = -(dO . num) / den^2 over all of Dv, num = q' S~ recomputed
            if NUM_DV_TILES == 1:
                num = _dot(q_op, s_op, None, HP_PREC)
                do_n = tl.sum(dot_ * num, axis=1)
            else:
                do_n = tl.zeros([BLOCK_T], dtype=tl.float32)
                for v0 in range(0, DV, BLOCK_DV):
                    offs_c = v0 + tl.arange(0, BLOCK_DV)
                    mc = offs_c < DV
                    dc = _tile(db, rr, mr, sd_t, offs_c, mc).to(tl.float32)
                    sc = tl.load(row + offs_k[:, None] * DV + offs_c[None, :],
                                 mask=mk[:, None] & mc[None, :], other=0.0)
                    do_n += tl.sum(dc * _dot(q_op, _cast(sc, sdt), None, HP_PREC), axis=1)
            c = -do_n * scale / (den * den)
            g = dot_ / den[:, None]
        else:
            g = dot_
        ds_acc = _dot(tl.trans(qt), _cast(g, dt), ds_acc, PREC)
        if NORM == 1:
            dz_acc += tl.sum(qt.to(tl.float32) * c[:, None], axis=0)
        if jv == 0:
            if NORM == 2:
                tl.store(drow + DK * DV + DK + tt, _cast(c, xdt), mask=mt)
            if NUM_DV_TILES == 1:
                dqt = _dot(_cast(g, sdt), tl.trans(s_op), None, HP_PREC)
            else:
                dqt = tl.zeros([BLOCK_T, BLOCK_DK], dtype=tl.float32)
                for v0 in range(0, DV, BLOCK_DV):
                    offs_c = v0 + tl.arange(0, BLOCK_DV)
                    mc = offs_c < DV
                    gc = _tile(db, rr, mr, sd_t, offs_c, mc).to(tl.float32)
                    if NORM > 0:
                        gc = gc / den[:, None]
                    sc = tl.load(row + offs_k[:, None] * DV + offs_c[None, :],
                                 mask=mk[:, None] & mc[None, :], other=0.0)
                    dqt = _dot(_cast(gc, sdt), tl.trans(_cast(sc, sdt)), dqt, HP_PREC)
            if NORM == 1:
                dqt += c[:, None] * z_m[None, :]
            tl.store(dqb + rr[:, None] * sdq_t + offs_k[None, :], _cast(dqt * scale, dq_ptr.dtype.element_ty),
                     mask=mr[:, None] & mk[None, :])
    if INPLACE:
        tl.debug_barrier()
    tl.store(drow + offs_k[:, None] * DV + offs_v[None, :], _cast(ds_acc * scale, xdt),
             mask=mk[:, None] & mv[None, :])
    if NORM > 0:
        if jv == 0:
            tl.store(drow + DK * DV + offs_k, _cast(dz_acc * scale, xdt), mask=mk)


@triton.jit
def _bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, z_ptr, dx_ptr, dq_ptr, dk_ptr, dv_ptr, dwp_ptr, map_ptr,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    sw_h, H, L, M, RS, scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr, NORM: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
    NUM_DV_TILES: tl.constexpr, SF32: tl.constexpr, GRID: tl.constexpr,
):
    """dk, dv of key block j from dX_j (state path) or from dX~ and W (direct path, also dW[:, j]).

    z_ptr: [B * H * M, DK] key sums z_j, read by the state path's reference normaliser only.
    """
    j, jv, bh, b, h, offs_t, offs_k, mk, offs_v, mv = _program_tiles(H, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_T)
    dt = k_ptr.dtype.element_ty
    kb = _block_ptr(k_ptr, b, h, j, L, sk_b, sk_t, sk_h, GRID)
    vb = _block_ptr(v_ptr, b, h, j, L, sv_b, sv_t, sv_h, GRID)
    qb = _block_ptr(q_ptr, b, h, j, L, sq_b, sq_t, sq_h, GRID)
    drow = dx_ptr + (bh * M + j).to(tl.int64) * RS
    if DIRECT:
        # recompute X_j (one token tile, one Dv tile), then dX_j = sum_i W[i, j] dX~_i and dW[:, j]
        mt = offs_t < L
        r0, m0 = _block_rows(map_ptr, j, offs_t, mt, L, GRID)
        kt = _tile(kb, r0, m0, sk_t, offs_k, mk)
        vt = _tile(vb, r0, m0, sv_t, offs_v, mv)
        s_j = _dot(tl.trans(kt), vt, None, PREC)
        if NORM > 0:
            z_j = tl.sum(kt.to(tl.float32), axis=0)
            if NORM == 2:
                qt = _tile(qb, r0, m0, sq_t, offs_k, mk)
                p_j = tl.sum(qt.to(tl.float32) * z_j[None, :], axis=1) * scale
        ds = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
        dz = tl.zeros([BLOCK_DK], dtype=tl.float32)
        dp = tl.zeros([BLOCK_T], dtype=tl.float32)
        base = dx_ptr + (bh * M).to(tl.int64) * RS
        for i in range(0, M):
            wij = tl.load(w_ptr + h * sw_h + i * M + j)
            row_i = base + i * RS
            dst = tl.load(row_i + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                          other=0.0).to(tl.float32)
            ds += wij * dst
            dwij = tl.sum(tl.sum(dst * s_j, axis=1), axis=0)
            if NORM > 0:
                dzt = tl.load(row_i + DK * DV + offs_k, mask=mk, other=0.0).to(tl.float32)
                dz += wij * dzt
                dwij += tl.sum(dzt * z_j, axis=0)
                if NORM == 2:
                    ct = tl.load(row_i + DK * DV + DK + offs_t, mask=mt, other=0.0).to(tl.float32)
                    dp += wij * ct
                    dwij += tl.sum(ct * p_j, axis=0)
            tl.store(dwp_ptr + (bh * M + i).to(tl.int64) * M + j, dwij)
    else:
        ds = tl.load(drow + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        if NORM > 0:
            dz = tl.load(drow + DK * DV + offs_k, mask=mk, other=0.0).to(tl.float32)
            if NORM == 2:
                z_j = tl.load(z_ptr + (bh * M + j).to(tl.int64) * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
    if NORM == 2:
        if jv == 0:
            # reference normaliser: dz_j += s Q_j^T dp_j and dq_{j,w} += s dp_{j,w} z_j
            dqb = _block_ptr(dq_ptr, b, h, j, L, sdq_b, sdq_t, sdq_h, GRID)
            for t0 in range(0, L, BLOCK_T):
                tt = t0 + offs_t
                mt = tt < L
                if DIRECT:
                    dp_t = dp
                else:
                    dp_t = tl.load(drow + DK * DV + DK + tt, mask=mt, other=0.0).to(tl.float32)
                rr, mr = _block_rows(map_ptr, j, tt, mt, L, GRID)
                qt = _tile(qb, rr, mr, sq_t, offs_k, mk)
                dz += tl.sum(qt.to(tl.float32) * dp_t[:, None], axis=0) * scale
                dq_ptrs = dqb + rr[:, None] * sdq_t + offs_k[None, :]
                dq_m = mr[:, None] & mk[None, :]
                dqt = tl.load(dq_ptrs, mask=dq_m, other=0.0).to(tl.float32)
                dqt += (scale * dp_t)[:, None] * z_j[None, :]
                tl.store(dq_ptrs, _cast(dqt, dq_ptr.dtype.element_ty), mask=dq_m)
    if SF32:  # fp16 inputs: keep dS in fp32 (its entries may exceed the fp16 range)
        sdt = tl.float32
    else:
        sdt = dt
    ds_d = _cast(ds, sdt)
    dkb = _block_ptr(dk_ptr, b, h, j, L, sdk_b, sdk_t, sdk_h, GRID)
    dvb = _block_ptr(dv_ptr, b, h, j, L, sdv_b, sdv_t, sdv_h, GRID)
    for t0 in range(0, L, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < L
        rr, mr = _block_rows(map_ptr, j, tt, mt, L, GRID)
        kt = _tile(kb, rr, mr, sk_t, offs_k, mk)
        vt = _tile(vb, rr, mr, sv_t, offs_v, mv)
        dvt = _dot(_cast(kt, sdt), ds_d, None, PREC)
        tl.store(dvb + rr[:, None] * sdv_t + offs_v[None, :], _cast(dvt, dv_ptr.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])
        if jv == 0:
            if NUM_DV_TILES == 1:
                dkt = _dot(_cast(vt, sdt), tl.trans(ds_d), None, PREC)
            else:
                dkt = tl.zeros([BLOCK_T, BLOCK_DK], dtype=tl.float32)
                for v0 in range(0, DV, BLOCK_DV):
                    offs_c = v0 + tl.arange(0, BLOCK_DV)
                    mc = offs_c < DV
                    vc = _tile(vb, rr, mr, sv_t, offs_c, mc)
                    dsc = tl.load(drow + offs_k[:, None] * DV + offs_c[None, :],
                                  mask=mk[:, None] & mc[None, :], other=0.0)
                    dkt = _dot(_cast(vc, sdt), tl.trans(_cast(dsc, sdt)), dkt, PREC)
            if NORM > 0:
                dkt += dz[None, :]
            tl.store(dkb + rr[:, None] * sdk_t + offs_k[None, :], _cast(dkt, dk_ptr.dtype.element_ty),
                     mask=mr[:, None] & mk[None, :])


# ------------------------------------------------------------------------------------------------
# launchers



@dataclass(frozen=True)
class Plan:
    """Sizes and choices of one call."""

    B: int
    H: int
    M: int
    L: int
    DK: int
    DV: int
    norm: int
    direct: bool
    fp32: bool
    block_dk: int
    block_dv: int
    n_dv: int
    row: int  # used columns C of a state row
    row_stride: int  # RS >= C, a multiple of 32
    prec: str  # tl.dot input precision of the token kernels
    mix_prec: str
    mix_bf16: bool
    hp: bool  # fp32 (tf32) operands for the S~ products of the backward
    sf32: bool  # fp16 inputs: fp32 (tf32) operands for every product with a state
    xdt: torch.dtype  # storage dtype of X (the block states) and of the forward's X~
    config: StateConfig  # the launch settings the launchers read

    def token_block(self, name: str) -> int:
        """BLOCK_T of token kernel `name` ("state", "out", "bwd_q", "bwd_kv"): the whole block on the
        direct path."""
        if self.direct:
            return _pow2(self.L)
        bt = self._token_launch(name).block_t
        if self.fp32:
            bt = min(bt, self.config.fp32_block_t)
        if self.block_dk > 128:
            bt = min(bt, 32)
        return min(bt, _pow2(self.L))

    def launch(self, name: str) -> dict[str, int]:
        """num_warps / num_stages of token kernel `name` (its direct variant's on the direct path)."""
        if self.direct:
            small = self.block_dk * self.block_dv <= 64 * 64
            cfg = self.config.direct_kernel if small else self.config.direct_kernel_large
        else:
            cfg = self._token_launch(name)
        return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    def _token_launch(self, name: str):
        if name == "bwd_q" and self.hp:
            return self.config.bwd_q_kernel_hp
        return getattr(self.config, f"{name}_kernel")


_PLANS: dict[tuple, Plan] = {}


def make_plan(q: torch.Tensor, v: torch.Tensor, L: int, M: int, norm: int, cfg: StateConfig) -> Plan:
    """Choose the path and the tile sizes for q [B, N, H, Dk], v [B, N, H, Dv] and M blocks of L tokens
    (M L = N, or more when a grid layout pads the blocks) under the settings `cfg`."""
    key = (q.shape, v.shape[-1], q.dtype, L, M, norm, cfg)
    plan = _PLANS.get(key)
    if plan is None:
        if not isinstance(cfg, StateConfig):
            raise ValueError(f"cfg must be a StateConfig, got {type(cfg).__name__}")
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(q, v, L, M, norm, cfg)
    return plan


def _make_plan(q: torch.Tensor, v: torch.Tensor, L: int, M: int, norm: int, cfg: StateConfig) -> Plan:
    B, _, H, DK = q.shape
    DV = v.shape[-1]
    fp32 = q.dtype == torch.float32
    block_dk = _pow2(DK)
    block_dv = min(_pow2(DV), max(16, cfg.max_block_dv_fp32 if fp32 else cfg.max_block_dv))
    n_dv = _cdiv(DV, block_dv)
    if cfg.variant == "auto":
        direct = (
            M <= cfg.direct_max_m and L <= cfg.direct_max_l and max(DK, DV) <= cfg.direct_max_d and n_dv == 1
            and _direct_is_cheaper(B * H, M, L, block_dk, block_dv, q.element_size(), cfg)
        )
    else:
        direct = cfg.variant == "direct" and L <= 128 and n_dv == 1
    C = DK * DV + (DK if norm > 0 else 0) + (L if norm == NORM_REFERENCE else 0)
    mix = "ieee" if fp32 else cfg.mix_prec_half
    xdt = torch.bfloat16 if cfg.state_dtype == "bfloat16" and not fp32 else torch.float32
    return Plan(
        B, H, M, L, DK, DV, norm, direct, fp32, block_dk, block_dv, n_dv, C, _cdiv(C, 32) * 32,
        prec="ieee" if fp32 else "tf32", mix_prec="tf32" if mix == "bf16" else mix,
        mix_bf16=mix == "bf16",
        hp=not fp32 and (cfg.bwd_tf32_half == "always" or (cfg.bwd_tf32_half == "exact" and norm == NORM_EXACT)
                         or q.dtype == torch.float16),
        sf32=q.dtype == torch.float16,
        xdt=xdt, config=cfg,
    )


def _direct_is_cheaper(BH: int, M: int, L: int, dk: int, dv: int, esize: int, cfg: StateConfig) -> bool:
    """Forward cost model: the direct path does M + 1 token products and moves q, k, v, o once;
    the state path does 2 plus the mixing GEMM, moves the states three times and launches twice more."""
    tok = 2.0 * BH * M * L * dk * dv  # one token product, padded head dims
    tokens = BH * M * L * (2 * dk + 2 * dv) * esize
    states = BH * M * (dk * dv + dk) * 4.0
    flops, bw = cfg.cost_flops, cfg.cost_bw
    direct = (M + 1) * tok * _pow2(L) / L / flops + tokens / bw  # whole block = one tile
    state = 2 * tok / flops + 2.0 * M * states / flops + (tokens + 3 * states) / bw
    return direct < state + 2 * cfg.cost_launch


def _states(p: Plan, q, k, v, scale: float, rowmap=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """X [B * H, M, RS] in `dtype` (default the plan's state dtype)."""
    x = torch.empty((p.B * p.H, p.M, p.row_stride), dtype=p.xdt if dtype is None else dtype, device=q.device)
    mp, grid = _grid_args(rowmap, x)
    _launch(
        _state_kernel, (p.M, p.n_dv, p.B * p.H),
        (q, k, v, x, mp, *_strides(q), *_strides(k), *_strides(v), p.H, p.L, p.M, p.row_stride, scale),
        dict(DK=p.DK, DV=p.DV, BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, BLOCK_T=p.token_block("state"),
             NORM=p.norm, PREC=p.prec, GRID=grid),
        p.launch("state"),
    )
    return x


def forward(q, k, v, w, L: int, norm: int, eps: float, scale: float, cfg: StateConfig, rowmap=None) -> torch.Tensor:
    """o [B, N, H, Dv] in v.dtype; q, k, v share one dtype and have unit last-dim stride; `cfg` the settings.

    rowmap: None for block-major tokens, else the int32 [M * L] row-major grid index of each
    block-major position (-1 for padding, `BlockLayout.token_index`): tokens stay in grid order.
    """
    w3, sw_h = _mixing3(w)
    p = make_plan(q, v, L, w3.shape[-1], norm, cfg)
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if p.direct:
        x = w3  # unused: each program forms its S~_i
    else:
        x = _states(p, q, k, v, scale, rowmap)
        x = _mix(p, w3, sw_h, x, trans=False, inplace_ok=True)
    mp, grid = _grid_args(rowmap, w3)
    _launch(
        _out_kernel, (p.M, p.n_dv, p.B * p.H),
        (q, k, v, w3, x, o, mp, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
         sw_h, p.H, p.L, p.M, p.row_stride, scale, eps),
        dict(DK=p.DK, DV=p.DV, BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, BLOCK_T=p.token_block("out"),
             NORM=p.norm, DIRECT=p.direct, PREC=p.prec, SF32=p.sf32, GRID=grid),
        p.launch("out"),
    )
    return o


def backward(do, q, k, v, w, L: int, norm: int, eps: float, scale: float, cfg: StateConfig, need_dw: bool = True,
             rowmap=None):
    """(dq, dk, dv, dW [Hw, M, M] fp32 or None) for the gradient do of forward(q, k, v, w, ..., cfg).

    State path buffers ([B * H, M, RS]): X (recomputed in the plan's state dtype, fp32 for the exact
    normaliser) and X~ (fp32), which becomes dX~ and then dX in place, so at most two are alive; dk and
    dv are allocated after X is freed.
    """
    w3, sw_h = _mixing3(w)
    p = make_plan(q, v, L, w3.shape[-1], norm, cfg)
    mp, gflag = _grid_args(rowmap, w3)
    BH = p.B * p.H
    grid = (p.M, p.n_dv, BH)
    dims = dict(DK=p.DK, DV=p.DV, BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv, NORM=p.norm, PREC=p.prec,
                DIRECT=p.direct, NUM_DV_TILES=p.n_dv, GRID=gflag)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if p.direct:
        xm = w3  # unused: each program forms its S~_i
        dxt = torch.empty((BH, p.M, p.row_stride), dtype=torch.float32, device=q.device)
        inplace = False
    else:
        # The backward's mixed states and their gradients are fp32. With the exact normaliser dq is a
        # difference of two close terms (S~ g and c z~), and bf16 S_j, z_j there cost 10x its accuracy
        # (interpreter, M = 40, L = 30: 3.9e-2 vs 1.7e-3), so X is recomputed in fp32 too.
        x = _states(p, q, k, v, scale, rowmap, torch.float32 if norm == NORM_EXACT else None)
        xm = _mix(p, w3, sw_h, x, trans=False, inplace_ok=False, out_dtype=torch.float32)
        inplace = p.n_dv == 1  # with several Dv tiles, program 0 reads all of S~_i while others write
        dxt = xm if inplace else torch.empty_like(xm)
    _launch(
        _bwd_q_kernel, grid,
        (q, k, v, do, w3, xm, dxt, dq, mp, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
         *_strides(dq), sw_h, p.H, p.L, p.M, p.row_stride, scale, eps),
        dict(dims, BLOCK_T=p.token_block("bwd_q"), INPLACE=inplace, HP=p.hp,
             HP_PREC="tf32" if p.hp else p.prec),
        p.launch("bwd_q"),
    )
    del xm
    dw = None
    if p.direct:
        z = w3  # unused
        dwp = torch.empty((BH, p.M, p.M), dtype=torch.float32, device=q.device)
        dx = dxt
    else:
        dwp = w3  # unused
        if need_dw:
            dw = _dw_partials(p, dxt, x)
        # the reference normaliser's dq term needs z_j: keep that slice, free X
        z = x[:, :, p.DK * p.DV:p.DK * (p.DV + 1)].contiguous() if norm == NORM_REFERENCE else w3
        del x
        dx = _mix(p, w3, sw_h, dxt, trans=True, inplace_ok=True)
    del dxt
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(
        _bwd_kv_kernel, grid,
        (q, k, v, w3, z, dx, dq, dk, dv, dwp, mp, *_strides(q), *_strides(k), *_strides(v), *_strides(dq),
         *_strides(dk), *_strides(dv), sw_h, p.H, p.L, p.M, p.row_stride, scale),
        dict(dims, BLOCK_T=p.token_block("bwd_kv"), SF32=p.sf32),
        p.launch("bwd_kv"),
    )
    if p.direct and need_dw:
        dw = dwp.view(p.B, p.H, p.M, p.M).sum(dim=0)
    if dw is not None and sw_h == 0:
        dw = dw.sum(dim=0, keepdim=True)
    return dq, dk, dv, dw
