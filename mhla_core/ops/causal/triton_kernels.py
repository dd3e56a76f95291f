"""Triton kernels for causal chunked MHLA (docs/spec.md section 2).

All kernels work on a flat list of "chunk rows": every chunk of every sequence (batch row or packed
document) that a call touches. Row c is described by the int32 table `tbl[c, :]`:

    TOK   first token of the chunk in the flattened token axis (b * T + t, or t when packed)
    LEN   tokens of the chunk (<= C; the first chunk after an offset and the last one may be short)
    FIRST row of the first chunk of the same sequence (rows of one sequence are consecutive)
    LAST  row of the last chunk of the same sequence
    WIDX  chunk index inside its sequence, i.e. the row/column of the mixing matrix W

q, k, v, o are [Ntok, H, D] contiguous; chunk states are [Nrows, H, Dk, Dv] (X = Dk * Dv per head).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mhla_core.ops.triton_helpers import UPCAST_DOT

# the table's columns and its row width, as constexprs the kernels index with
TOK, LEN, FIRST, LAST, WIDX = (tl.constexpr(i) for i in range(5))
NCOL = tl.constexpr(5)

# The Triton interpreter multiplies bf16 operands as raw uint16; there, dots run on fp32 copies.
_UPCAST = UPCAST_DOT


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC is a tl.dot input_precision, or "bf16" to round operands to bf16."""
    if PREC == "bf16":
        if _UPCAST:
            out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        if _UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
        else:
            out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def chunk_state_kernel(
    x_ptr, y_ptr, out_ptr, tbl_ptr, scale, H, DX, DY,
    BC: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, PREC: tl.constexpr,
):
    """out[c, h] = scale * X_c^T Y_c over the tokens of chunk row c (S = K^T V, or dS~ = s Q^T dO)."""
    nx, ny = tl.cdiv(DX, BX), tl.cdiv(DY, BY)
    pid = tl.program_id(0)  # flat grid, the tiles of one chunk adjacent (they share its tokens in L2)
    i_ch = pid // (nx * ny)
    i_x = (pid % (nx * ny)) // ny
    i_y = pid % ny
    c = i_ch // H
    h = i_ch % H
    tok0 = tl.load(tbl_ptr + c * NCOL + TOK).to(tl.int64)
    n = tl.load(tbl_ptr + c * NCOL + LEN)
    t = tl.arange(0, BC)
    ox = i_x * BX + tl.arange(0, BX)
    oy = i_y * BY + tl.arange(0, BY)
    row0 = tok0 * H + h
    xt = tl.load(x_ptr + row0 * DX + t[None, :] * (H * DX) + ox[:, None],
                 mask=(t[None, :] < n) & (ox[:, None] < DX), other=0.0)
    y = tl.load(y_ptr + row0 * DY + t[:, None] * (H * DY) + oy[None, :],
                mask=(t[:, None] < n) & (oy[None, :] < DY), other=0.0)
    acc = _dot(xt, y, PREC) * scale
    base = out_ptr + (c.to(tl.int64) * H + h) * DX * DY
    tl.store(base + ox[:, None] * DY + oy[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(ox[:, None] < DX) & (oy[None, :] < DY))


@triton.jit
def mix_kernel(
    s_ptr, w_ptr, add_ptr, out_ptr, tbl_ptr, NR, H, X, L,
    TRANS: tl.constexpr, HAS_ADD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):
    """Mix chunk states of one sequence with W (strictly lower part), for one head:

    TRANS=False: out[q] = sum_{r < q, same seq} W[w(q), w(r)] S[r]      (S~ from S)
    TRANS=True:  out[r] = sum_{q > r, same seq} W[w(q), w(r)] S[q]      (dS from dS~)
    plus add[...] when HAS_ADD. Grid: (row blocks of BM, column blocks of BN, H); row blocks vary
    fastest so that programs running together share their column tiles of S in L2.
    """
    i_m, i_n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m0 = i_m * BM
    i = tl.arange(0, BM)
    rows = m0 + i
    rmask = rows < NR
    cols = i_n * BN + tl.arange(0, BN)
    cmask = cols < X
    r_first = tl.load(tbl_ptr + rows * NCOL + FIRST, mask=rmask, other=-1)
    r_w = tl.load(tbl_ptr + rows * NCOL + WIDX, mask=rmask, other=0)
    m_last = tl.minimum(m0 + BM, NR) - 1
    if TRANS:
        lo = m0 + 1
        hi = tl.load(tbl_ptr + m_last * NCOL + LAST) + 1
    else:
        lo = tl.load(tbl_ptr + m0 * NCOL + FIRST)
        hi = m_last
    lo = (lo // BR) * BR
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    w_base = w_ptr + h * L * L
    j = tl.arange(0, BR)
    for k0 in range(lo, hi, BR):
        kr = k0 + j
        kmask = kr < hi
        k_first = tl.load(tbl_ptr + kr * NCOL + FIRST, mask=kmask, other=-2)
        k_w = tl.load(tbl_ptr + kr * NCOL + WIDX, mask=kmask, other=0)
        same = (k_first[None, :] == r_first[:, None]) & kmask[None, :] & rmask[:, None]
        if TRANS:
            ok = same & (kr[None, :] > rows[:, None])
            w = tl.load(w_base + k_w[None, :] * L + r_w[:, None], mask=ok, other=0.0)
        else:
            ok = same & (kr[None, :] < rows[:, None])
            w = tl.load(w_base + r_w[:, None] * L + k_w[None, :], mask=ok, other=0.0)
        s_blk = s_ptr + (k0 * H + h).to(tl.int64) * X
        s = tl.load(s_blk + j[:, None] * (H * X) + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        # Non-finite states are zeroed for the product, so that one never meets a row it does not
        # belong to under a zero weight (another sequence, a later chunk: 0 * NaN = NaN), and marked
        # NaN only in the rows that do read them (docs/spec.md section 5).
        finite = tl.abs(s.to(tl.float32)) < float("inf")  # False for NaN and +-inf
        part = _dot(w.to(s.dtype), tl.where(finite, s, 0.0).to(s.dtype), PREC)
        if tl.sum(tl.where(finite, 0, 1)) > 0:
            reads = _dot(tl.where(ok, 1.0, 0.0), tl.where(finite, 0.0, 1.0), "ieee")
            part = tl.where(reads > 0, float("nan"), part)
        acc += part
    o_blk = (m0.to(tl.int64) * H + h) * X
    offs = i[:, None] * (H * X) + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + o_blk + offs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_blk + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def mix_grad_kernel(
    g_ptr, s_ptr, dw_ptr, tbl_ptr, NR, H, X, L, NRB, x_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BX: tl.constexpr, PREC: tl.constexpr,
):
    """dW[h, w(q), w(r)] += <G[q, h], S[r, h]> for r < q of one sequence (G = dS~), via atomics.

    Grid: (q-block * NRB + r-block, H, split of the X = Dk * Dv columns); block pairs vary fastest
    so that programs running together share one column slice in L2. Pairs with no r < q of one
    sequence exit at once.
    """
    pid, h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_q = pid // NRB
    i_r = pid % NRB
    q0 = i_q * BM
    r0 = i_r * BN
    q_hi = tl.minimum(q0 + BM, NR) - 1
    first_q0 = tl.load(tbl_ptr + q0 * NCOL + FIRST)
    if (r0 < q_hi) & (r0 + BN - 1 >= first_q0):
        a_i = tl.arange(0, BM)
        b_i = tl.arange(0, BN)
        qr = q0 + a_i
        rr = r0 + b_i
        qm = qr < NR
        rm = rr < NR
        x_lo = i_s * x_per_split
        x_hi = tl.minimum(x_lo + x_per_split, X)
        g_blk = g_ptr + (q0.to(tl.int64) * H + h) * X
        s_blk = s_ptr + (r0.to(tl.int64) * H + h) * X
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for x0 in range(x_lo, x_hi, BX):
            xs = x0 + tl.arange(0, BX)
            xm = xs < x_hi
            a = tl.load(g_blk + a_i[:, None] * (H * X) + xs[None, :], mask=qm[:, None] & xm[None, :], other=0.0)
            b = tl.load(s_blk + b_i[None, :] * (H * X) + xs[:, None], mask=rm[None, :] & xm[:, None], other=0.0)
            acc += _dot(a.to(b.dtype), b, PREC)
        q_first = tl.load(tbl_ptr + qr * NCOL + FIRST, mask=qm, other=-1)
        r_first = tl.load(tbl_ptr + rr * NCOL + FIRST, mask=rm, other=-2)
        q_w = tl.load(tbl_ptr + qr * NCOL + WIDX, mask=qm, other=0)
        r_w = tl.load(tbl_ptr + rr * NCOL + WIDX, mask=rm, other=0)
        ok = (q_first[:, None] == r_first[None, :]) & (rr[None, :] < qr[:, None]) & qm[:, None] & rm[None, :]
        tl.atomic_add(dw_ptr + h * L * L + q_w[:, None] * L + r_w[None, :], acc, mask=ok)


@triton.jit
def _chunk_row(tbl_ptr, w_ptr, i_ch, H, L, BC: tl.constexpr):
    """Chunk row c and head h of program row i_ch = c * H + h: (c, h, its W index wi, d = W[h, wi, wi],
    token offsets t < BC, their mask t < LEN, and the flat [token, head] row of its first token)."""
    c = i_ch // H
    h = i_ch % H
    tok0 = tl.load(tbl_ptr + c * NCOL + TOK).to(tl.int64)
    n = tl.load(tbl_ptr + c * NCOL + LEN)
    wi = tl.load(tbl_ptr + c * NCOL + WIDX)
    d = tl.load(w_ptr + h * L * L + wi * (L + 1))
    t = tl.arange(0, BC)
    return c, h, wi, d, t, t < n, tok0 * H + h


@triton.jit
def chunk_fwd_o_kernel(
    q_ptr, k_ptr, v_ptr, st_ptr, w_ptr, o_ptr, tbl_ptr, scale, H, DK, DV, L,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """o = s Q S~ + s W[i, i] tril(Q K^T) V for chunk row c, head h, one tile of Dv."""
    nv = tl.cdiv(DV, BV)
    i_ch = tl.program_id(0) // nv
    i_v = tl.program_id(0) % nv
    c, h, wi, d, t, tm, row0 = _chunk_row(tbl_ptr, w_ptr, i_ch, H, L, BC)
    q_blk, k_blk = q_ptr + row0 * DK, k_ptr + row0 * DK
    ov = i_v * BV + tl.arange(0, BV)
    vm = ov < DV
    st_blk = st_ptr + (c.to(tl.int64) * H + h) * DK * DV
    acc_o = tl.zeros([BC, BV], dtype=tl.float32)
    acc_p = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        ok = k0 + tl.arange(0, BK)
        km = ok < DK
        q = tl.load(q_blk + t[:, None] * (H * DK) + ok[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        kt = tl.load(k_blk + t[None, :] * (H * DK) + ok[:, None], mask=tm[None, :] & km[:, None], other=0.0)
        st = tl.load(st_blk + ok[:, None] * DV + ov[None, :], mask=km[:, None] & vm[None, :], other=0.0)
        acc_p += _dot(q, kt, PREC)
        acc_o += _dot(q, st.to(q.dtype), PREC)
    p = tl.where(t[:, None] >= t[None, :], acc_p * d, 0.0)
    v_offs = row0 * DV + t[:, None] * (H * DV) + ov[None, :]
    v = tl.load(v_ptr + v_offs, mask=tm[:, None] & vm[None, :], other=0.0)
    acc_o += _dot(p.to(v.dtype), v, PREC)
    tl.store(o_ptr + v_offs, (acc_o * scale).to(o_ptr.dtype.element_ty), mask=tm[:, None] & vm[None, :])


@triton.jit
def chunk_bwd_dqdk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, st_ptr, ds_ptr, w_ptr, dq_ptr, dk_ptr, tbl_ptr, scale, H, DK, DV, L,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq = s dO S~^T + s W[i,i] tril(dO V^T) K;  dk = V dS^T + s W[i,i] tril(dO V^T)^T Q (one Dk tile)."""
    nk = tl.cdiv(DK, BK)
    i_ch = tl.program_id(0) // nk
    i_k = tl.program_id(0) % nk
    c, h, wi, d, t, tm, row0 = _chunk_row(tbl_ptr, w_ptr, i_ch, H, L, BC)
    do_blk, v_blk = do_ptr + row0 * DV, v_ptr + row0 * DV
    ok = i_k * BK + tl.arange(0, BK)
    km = ok < DK
    s_off = (c.to(tl.int64) * H + h) * DK * DV
    st_blk, ds_blk = st_ptr + s_off, ds_ptr + s_off
    acc_dq = tl.zeros([BC, BK], dtype=tl.float32)
    acc_dk = tl.zeros([BC, BK], dtype=tl.float32)
    acc_dp = tl.zeros([BC, BC], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        vm = ov < DV
        offs = t[:, None] * (H * DV) + ov[None, :]
        do = tl.load(do_blk + offs, mask=tm[:, None] & vm[None, :], other=0.0)
        v = tl.load(v_blk + offs, mask=tm[:, None] & vm[None, :], other=0.0)
        s_offs = ok[None, :] * DV + ov[:, None]  # [BV, BK]: the transposed tile
        st_t = tl.load(st_blk + s_offs, mask=km[None, :] & vm[:, None], other=0.0)
        ds_t = tl.load(ds_blk + s_offs, mask=km[None, :] & vm[:, None], other=0.0)
        acc_dp += _dot(do, tl.trans(v), PREC)
        acc_dq += _dot(do, st_t.to(do.dtype), PREC)
        acc_dk += _dot(v, ds_t.to(v.dtype), PREC)
    dp = tl.where(t[:, None] >= t[None, :], acc_dp * d, 0.0)
    k_offs = row0 * DK + t[:, None] * (H * DK) + ok[None, :]
    kmask = tm[:, None] & km[None, :]
    q = tl.load(q_ptr + k_offs, mask=kmask, other=0.0)
    k = tl.load(k_ptr + k_offs, mask=kmask, other=0.0)
    acc_dq += _dot(dp.to(k.dtype), k, PREC)
    acc_dk += _dot(tl.trans(dp).to(q.dtype), q, PREC) * scale
    tl.store(dq_ptr + k_offs, (acc_dq * scale).to(dq_ptr.dtype.element_ty), mask=kmask)
    tl.store(dk_ptr + k_offs, acc_dk.to(dk_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def chunk_bwd_dv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ds_ptr, w_ptr, dv_ptr, dw_ptr, tbl_ptr, scale, H, DK, DV, L,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dv = K dS + s W[i,i] tril(Q K^T)^T dO (one Dv tile); dW[i, i] += s <tril(Q K^T) V, dO>."""
    nv = tl.cdiv(DV, BV)
    i_ch = tl.program_id(0) // nv
    i_v = tl.program_id(0) % nv
    c, h, wi, d, t, tm, row0 = _chunk_row(tbl_ptr, w_ptr, i_ch, H, L, BC)
    q_blk, k_blk = q_ptr + row0 * DK, k_ptr + row0 * DK
    ov = i_v * BV + tl.arange(0, BV)
    vm = ov < DV
    ds_blk = ds_ptr + (c.to(tl.int64) * H + h) * DK * DV
    acc_dv = tl.zeros([BC, BV], dtype=tl.float32)
    acc_p = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        ok = k0 + tl.arange(0, BK)
        km = ok < DK
        offs = t[:, None] * (H * DK) + ok[None, :]
        q = tl.load(q_blk + offs, mask=tm[:, None] & km[None, :], other=0.0)
        k = tl.load(k_blk + offs, mask=tm[:, None] & km[None, :], other=0.0)
        ds = tl.load(ds_blk + ok[:, None] * DV + ov[None, :], mask=km[:, None] & vm[None, :], other=0.0)
        acc_p += _dot(q, tl.trans(k), PREC)
        acc_dv += _dot(k, ds.to(k.dtype), PREC)
    p = tl.where(t[:, None] >= t[None, :], acc_p * scale, 0.0)  # [query t, key u]
    v_offs = row0 * DV + t[:, None] * (H * DV) + ov[None, :]
    vmask = tm[:, None] & vm[None, :]
    do = tl.load(do_ptr + v_offs, mask=vmask, other=0.0)
    v = tl.load(v_ptr + v_offs, mask=vmask, other=0.0)
    pdo = _dot(tl.trans(p).to(do.dtype), do, PREC)  # [u, BV]
    acc_dv += pdo * d
    tl.store(dv_ptr + v_offs, acc_dv.to(dv_ptr.dtype.element_ty), mask=vmask)
    gd = tl.sum(tl.sum(pdo * v.to(tl.float32), axis=1), axis=0)
    tl.atomic_add(dw_ptr + h * L * L + wi * (L + 1), gd)


@triton.jit
def chunk_bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, st_ptr, ds_ptr, w_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, tbl_ptr,
    scale, H, DK, DV, L,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq, dk, dv and the dW diagonal of chunk row c, head h in one program (BK >= DK; loops over Dv tiles).

    Same math as chunk_bwd_dqdk_kernel + chunk_bwd_dv_kernel, reading Q, K, V, dO, S~ and dS once.
    """
    c, h, wi, d, t, tm, row0 = _chunk_row(tbl_ptr, w_ptr, tl.program_id(0), H, L, BC)
    ok = tl.arange(0, BK)
    km = ok < DK
    k_offs = row0 * DK + t[:, None] * (H * DK) + ok[None, :]
    kmask = tm[:, None] & km[None, :]
    q = tl.load(q_ptr + k_offs, mask=kmask, other=0.0)
    k = tl.load(k_ptr + k_offs, mask=kmask, other=0.0)
    p = tl.where(t[:, None] >= t[None, :], _dot(q, tl.trans(k), PREC) * scale, 0.0)  # [query t, key u]
    pt = tl.trans(p).to(k.dtype)
    s_off = (c.to(tl.int64) * H + h) * DK * DV
    st_blk, ds_blk = st_ptr + s_off, ds_ptr + s_off
    acc_dq = tl.zeros([BC, BK], dtype=tl.float32)
    acc_dk = tl.zeros([BC, BK], dtype=tl.float32)
    acc_dp = tl.zeros([BC, BC], dtype=tl.float32)
    gd = tl.zeros([BV], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        vm = ov < DV
        v_offs = row0 * DV + t[:, None] * (H * DV) + ov[None, :]
        vmask = tm[:, None] & vm[None, :]
        do = tl.load(do_ptr + v_offs, mask=vmask, other=0.0)
        v = tl.load(v_ptr + v_offs, mask=vmask, other=0.0)
        s_offs = ok[:, None] * DV + ov[None, :]
        smask = km[:, None] & vm[None, :]
        st = tl.load(st_blk + s_offs, mask=smask, other=0.0).to(do.dtype)
        ds = tl.load(ds_blk + s_offs, mask=smask, other=0.0).to(do.dtype)
        acc_dp += _dot(do, tl.trans(v), PREC)
        acc_dq += _dot(do, tl.trans(st), PREC)
        acc_dk += _dot(v, tl.trans(ds), PREC)
        pdo = _dot(pt, do, PREC)  # [u, BV]
        dv = _dot(k, ds, PREC) + pdo * d
        tl.store(dv_ptr + v_offs, dv.to(dv_ptr.dtype.element_ty), mask=vmask)
        gd += tl.sum(pdo * v.to(tl.float32), axis=0)
    dp = tl.where(t[:, None] >= t[None, :], acc_dp * d, 0.0)
    acc_dq += _dot(dp.to(k.dtype), k, PREC)
    acc_dk += _dot(tl.trans(dp).to(q.dtype), q, PREC) * scale
    tl.store(dq_ptr + k_offs, (acc_dq * scale).to(dq_ptr.dtype.element_ty), mask=kmask)
    tl.store(dk_ptr + k_offs, acc_dk.to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.atomic_add(dw_ptr + h * L * L + wi * (L + 1), tl.sum(gd, axis=0))


