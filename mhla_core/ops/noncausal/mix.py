"""Block mixing of the non-causal state path: X~ = W X over blocks for every (b, h), and dW.

A block's state row X_j (fp32, or bf16 with `StateConfig.state_dtype`; `chunk.py`) is mixed by one
GEMM over blocks per (b, h): X~ = W X forward, dX = W^T dX~ backward (`StateConfig.mix_impl`): by
`_mix_ws_kernel` (W rows held by each program while it streams columns of X; "stationary", and "auto"
where `_stationary_pays`), by `_mix_kernel` (a tiled GEMM that reloads W tiles; "triton", and "auto"
otherwise; in place when one program covers all M rows), or by one batched cuBLAS GEMM ("matmul", and "auto"
on CUDA when M is a multiple of 64).
dW = sum_b dX~ X^T comes from `_dw_kernel`'s partial sums over column splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from mhla_core.ops.noncausal.launch import launch as _launch
from mhla_core.ops.triton_helpers import cast as _cast
from mhla_core.ops.triton_helpers import cdiv as _cdiv
from mhla_core.ops.triton_helpers import dot as _dot
from mhla_core.ops.triton_helpers import next_pow2 as _pow2

if TYPE_CHECKING:
    from mhla_core.ops.noncausal.chunk import Plan


@triton.jit
def _mix_kernel(
    w_ptr, x_ptr, y_ptr, sw_h, H, M, C, RS,
    TRANS_W: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    PREC: tl.constexpr, AS_BF16: tl.constexpr, INPLACE: tl.constexpr,
):
    """Y[bh] = W[h] X[bh] (or W[h]^T X[bh]) over the first C columns; in place is safe with one I tile."""
    pi = tl.program_id(0)
    pc = tl.program_id(1)
    bh = tl.program_id(2)
    h = bh % H
    offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < M
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    wb = w_ptr + h * sw_h
    xb = x_ptr + (bh * M).to(tl.int64) * RS
    acc = tl.zeros([BLOCK_I, BLOCK_C], dtype=tl.float32)
    for j0 in range(0, M, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < M
        wm = mi[:, None] & mj[None, :]
        if TRANS_W:
            w = tl.load(wb + offs_j[None, :] * M + offs_i[:, None], mask=wm, other=0.0)
        else:
            w = tl.load(wb + offs_i[:, None] * M + offs_j[None, :], mask=wm, other=0.0)
        x = tl.load(xb + offs_j[:, None] * RS + offs_c[None, :], mask=mj[:, None] & mc[None, :], other=0.0)
        if AS_BF16:
            acc = _dot(_cast(w, tl.bfloat16), _cast(x, tl.bfloat16), acc, PREC)
        else:
            acc = _dot(w, x, acc, PREC)
    if INPLACE:
        tl.debug_barrier()
    yb = y_ptr + (bh * M).to(tl.int64) * RS
    tl.store(yb + offs_i[:, None] * RS + offs_c[None, :], _cast(acc, y_ptr.dtype.element_ty),
             mask=mi[:, None] & mc[None, :])


@triton.jit
def _mix_ws_kernel(
    w_ptr, x_ptr, y_ptr, sw_h, H, M, C, RS, cols_per_prog,
    TRANS_W: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    PREC: tl.constexpr, AS_BF16: tl.constexpr,
):
    """Y[bh] = W[h] X[bh] (or W^T X) with the program's W rows held across its columns (weight stationary).

    Program (i tile, column group, bh) loads W[i tile, all M blocks] once (BLOCK_K >= M) and streams
    cols_per_prog columns of X through one K = BLOCK_K product per BLOCK_C columns. The i tile is the
    fastest grid axis, so the programs that read the same columns of X run together (L2 hits).
    In place is safe when one i tile covers all M rows (each program reads its columns before writing).
    """
    pi = tl.program_id(0)
    pc = tl.program_id(1)
    bh = tl.program_id(2)
    h = bh % H
    offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < M
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < M
    wb = w_ptr + h * sw_h
    wm = mi[:, None] & mk[None, :]
    if TRANS_W:
        w = tl.load(wb + offs_k[None, :] * M + offs_i[:, None], mask=wm, other=0.0)
    else:
        w = tl.load(wb + offs_i[:, None] * M + offs_k[None, :], mask=wm, other=0.0)
    if AS_BF16:
        w = _cast(w, tl.bfloat16)
    xb = x_ptr + (bh * M).to(tl.int64) * RS
    yb = y_ptr + (bh * M).to(tl.int64) * RS
    c_start = pc * cols_per_prog
    c_end = tl.minimum(C, c_start + cols_per_prog)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < c_end
        x = tl.load(xb + offs_k[:, None] * RS + offs_c[None, :], mask=mk[:, None] & mc[None, :], other=0.0)
        if AS_BF16:
            acc = _dot(w, _cast(x, tl.bfloat16), None, PREC)
        else:
            acc = _dot(w, x, None, PREC)
        tl.store(yb + offs_i[:, None] * RS + offs_c[None, :], _cast(acc, y_ptr.dtype.element_ty),
                 mask=mi[:, None] & mc[None, :])


@triton.jit
def _dw_kernel(
    a_ptr, x_ptr, p_ptr, M, C, RS, cols_per_split, n_split, n_tj,
    BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr, AS_BF16: tl.constexpr,
):
    """Partial dW[bh, split] = dX~[bh][:, cols] X[bh][:, cols]^T over one column split."""
    pij = tl.program_id(0)
    sp = tl.program_id(1)
    bh = tl.program_id(2)
    ti = pij // n_tj
    tj = pij % n_tj
    offs_i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tj * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < M
    mj = offs_j < M
    ab = a_ptr + (bh * M).to(tl.int64) * RS
    xb = x_ptr + (bh * M).to(tl.int64) * RS
    c_start = sp * cols_per_split
    c_end = tl.minimum(C, c_start + cols_per_split)
    acc = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < c_end
        a = tl.load(ab + offs_i[:, None] * RS + offs_c[None, :], mask=mi[:, None] & mc[None, :], other=0.0)
        x = tl.load(xb + offs_j[:, None] * RS + offs_c[None, :], mask=mj[:, None] & mc[None, :], other=0.0)
        if AS_BF16:
            acc = _dot(_cast(a, tl.bfloat16), tl.trans(_cast(x, tl.bfloat16)), acc, PREC)
        else:  # bf16 states X are widened exactly
            acc = _dot(a.to(tl.float32), tl.trans(x.to(tl.float32)), acc, PREC)
    pb = p_ptr + ((bh * n_split + sp) * M).to(tl.int64) * M
    tl.store(pb + offs_i[:, None] * M + offs_j[None, :], acc, mask=mi[:, None] & mj[None, :])


def _mixing3(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mixing as fp32 [Hw, M, M] contiguous and its head stride (0 when shared)."""
    w3 = w if w.dtype == torch.float32 and w.is_contiguous() else w.to(torch.float32).contiguous()
    if w3.dim() == 2:
        return w3, 0
    return w3, w3.stride(0)


def _mix(p: Plan, w3: torch.Tensor, sw_h: int, x: torch.Tensor, trans: bool, inplace_ok: bool,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W X (or W^T X) over blocks for every (b, h), by the Triton kernel or cuBLAS (`StateConfig.mix_impl`),
    in `out_dtype` (default x.dtype). bf16 states take bf16 operands (W rounded too), fp32 ones the plan's
    mixing precision. "auto" takes cuBLAS where `_matmul_pays`, else the weight-stationary kernel where
    `_stationary_pays` (H200, 2026-12-02: Wan forward 0.305 vs 0.424 ms with bf16 operands), else the
    tiled one."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    impl = p.config.mix_impl
    if impl == "matmul" or (impl == "auto" and _matmul_pays(p, x)):
        return _mix_matmul(p, w3, x, trans, out_dtype)
    inplace_ok = inplace_ok and out_dtype == x.dtype
    if impl == "stationary" or (impl == "auto" and _stationary_pays(p, x)):
        return _mix_stationary(p, w3, sw_h, x, trans, inplace_ok, out_dtype)
    return _mix_triton(p, w3, sw_h, x, trans, inplace_ok, out_dtype)


def _matmul_pays(p: Plan, x: torch.Tensor) -> bool:
    """mix_impl "auto": cuBLAS on CUDA when M is a multiple of `StateConfig.mix_matmul_m_multiple` (0: never)
    and there are at least `mix_matmul_min_rows` state rows (B H M). H200, 2026-12-02 (docs/kernels.md):
    fwd+bwd DiT-XL/2 512 (M = 64, 16,384 rows) 2.86 vs 3.60 ms, DiT-XL/2 1024 (M = 256, 16,384 rows) 3.22 vs
    4.52; at 4K (M = 64, 768 rows) 1.86 vs 1.51 with the reference normaliser; at Wan (M = 150) its forward
    was slower, 0.356 vs 0.302 ms."""
    k = p.config.mix_matmul_m_multiple
    return x.is_cuda and k > 0 and p.M % k == 0 and p.B * p.H * p.M >= p.config.mix_matmul_min_rows


def _mix_matmul(p: Plan, w3: torch.Tensor, x: torch.Tensor, trans: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The mixing as one batched cuBLAS GEMM per call, written in `out_dtype` by the GEMM itself: bf16
    operands (bf16 states, or `mix_prec_half="bf16"`) with fp32 accumulation, else fp32 operands in the
    plan's precision (tf32 switched on for this call only).

    Columns past p.row (row padding) are multiplied too; each output column depends only on the same
    input column, so whatever they hold never reaches the used columns.
    """
    w = w3.transpose(-1, -2) if trans else w3
    BH, M, RS = x.shape
    wb = (w.expand(BH, M, M) if w.dim() == 2 else w.unsqueeze(0).expand(p.B, p.H, M, M).reshape(BH, M, M))
    if _bf16_operands(p, x):
        a, b = wb.to(torch.bfloat16), x.to(torch.bfloat16)
        if out_dtype == torch.bfloat16:
            return torch.bmm(a, b)
        if x.is_cuda:
            return torch.bmm(a, b, out_dtype=torch.float32).to(out_dtype)
        return torch.bmm(a.float(), b.float()).to(out_dtype)  # the same exact products, fp32 sums
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = p.mix_prec == "tf32"
    try:
        return torch.bmm(wb, x).to(out_dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def _bf16_operands(p: Plan, x: torch.Tensor) -> bool:
    """The mixing of `x` takes bf16 operands: bf16 states, or `mix_prec_half="bf16"`."""
    return p.mix_bf16 or x.dtype == torch.bfloat16


def _stationary_pays(p: Plan, x: torch.Tensor) -> bool:
    """mix_impl "auto": the weight-stationary kernel for M up to `mix_ws_max_m`; with fp32 operands only
    when its W row tiles are not padded (M a multiple of the tile). H200, 2026-12-02, fwd+bwd with
    128-row fp32 tiles: DiT-XL/2 512 (M = 64) 3.19 vs 3.64 ms, 1024 (M = 256) 4.12 vs 4.89, but Wan
    (M = 150, rows padded to 256) 2.25 vs 1.84 (docs/kernels.md)."""
    bk = _pow2(p.M)
    if bk > p.config.mix_ws_max_m:
        return False
    if _bf16_operands(p, x):
        return True
    return p.M % min(p.config.mix_ws_kernel_fp32.block_i, bk) == 0


def _mix_stationary(p: Plan, w3: torch.Tensor, sw_h: int, x: torch.Tensor, trans: bool, inplace_ok: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The mixing by `_mix_ws_kernel` (M <= StateConfig's mix_ws limit); in place when allowed and one i tile
    covers all M rows. The launch settings are `mix_ws_kernel` (bf16 operands) or `mix_ws_kernel_fp32`."""
    as_bf16 = _bf16_operands(p, x)
    cfg = p.config.mix_ws_kernel if as_bf16 else p.config.mix_ws_kernel_fp32
    bk = _pow2(p.M)
    bi = min(cfg.block_i, bk)
    n_i = _cdiv(p.M, bi)
    y = x if inplace_ok and n_i == 1 else torch.empty_like(x, dtype=out_dtype)
    bc = min(cfg.block_c, _pow2(p.row))
    n_chunks = _cdiv(p.row, bc)
    groups = max(1, min(n_chunks, _cdiv(cfg.min_programs, n_i * p.B * p.H)))
    cols = _cdiv(n_chunks, groups) * bc
    _launch(
        _mix_ws_kernel, (n_i, _cdiv(p.row, cols), p.B * p.H),
        (w3, x, y, sw_h, p.H, p.M, p.row, p.row_stride, cols),
        dict(TRANS_W=trans, BLOCK_I=bi, BLOCK_K=bk, BLOCK_C=bc, PREC=p.mix_prec, AS_BF16=as_bf16),
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    return y


def _mix_triton(p: Plan, w3: torch.Tensor, sw_h: int, x: torch.Tensor, trans: bool, inplace_ok: bool,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mixing as a Triton kernel; in place when allowed and one program covers all M rows. Settings:
    `mix_kernel_bf16` for bf16 operands, `mix_kernel` for tf32 ones."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    as_bf16 = _bf16_operands(p, x)
    cfg = p.config.mix_kernel_bf16 if as_bf16 else p.config.mix_kernel
    bi = _pow2(p.M) if p.M <= cfg.block_i else cfg.block_i_large
    n_i = _cdiv(p.M, bi)
    inplace = inplace_ok and n_i == 1
    y = x if inplace else torch.empty_like(x, dtype=out_dtype)
    bc = min(cfg.block_c, _pow2(p.row))
    _launch(
        _mix_kernel, (n_i, _cdiv(p.row, bc), p.B * p.H),
        (w3, x, y, sw_h, p.H, p.M, p.row, p.row_stride),
        dict(TRANS_W=trans, BLOCK_I=bi, BLOCK_J=min(cfg.block_j, _pow2(p.M)), BLOCK_C=bc,
             PREC=p.mix_prec, AS_BF16=as_bf16, INPLACE=inplace),
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    return y


def _dw_partials(p: Plan, dxt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW [H, M, M] fp32 = sum over b of dX~ X^T, from partial sums over column splits."""
    cfg = p.config.dw_kernel
    bi = min(_pow2(p.M), max(16, cfg.block_i))
    n_t = _cdiv(p.M, bi)
    bc = min(cfg.block_c, _pow2(p.row))
    n_col = _cdiv(p.row, bc)
    n_split = max(1, min(n_col, _cdiv(cfg.min_programs, p.B * p.H * n_t * n_t)))
    cols = _cdiv(n_col, n_split) * bc
    n_split = _cdiv(p.row, cols)
    part = torch.empty((p.B * p.H * n_split, p.M, p.M), dtype=torch.float32, device=x.device)
    _launch(
        _dw_kernel, (n_t * n_t, n_split, p.B * p.H),
        (dxt, x, part, p.M, p.row, p.row_stride, cols, n_split, n_t),
        dict(BLOCK_I=bi, BLOCK_C=bc, PREC=p.mix_prec, AS_BF16=p.mix_bf16),
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    return part.view(p.B, p.H, n_split, p.M, p.M).sum(dim=(0, 2))
