"""Triton backend of non-causal MHLA: custom ops `mhla::noncausal_fwd` / `mhla::noncausal_bwd`.

`mhla_triton` is what `mhla(..., backend="triton")` calls. In eager mode it runs a plain
`torch.autograd.Function` (less dispatch overhead); under `torch.compile` it calls the custom op,
which has fake implementations and a registered autograd formula, so the op never breaks a graph.
The kernels and the math are in `triton_kernels.py`.
"""

from __future__ import annotations

import torch

from mhla_core.ops.noncausal import triton_kernels as K

_NORM = {"exact": K.NORM_EXACT, "reference": K.NORM_REFERENCE}
_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _norm_mode(normalize: bool, normalizer: str) -> int:
    return _NORM[normalizer] if normalize else K.NORM_NONE


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare(q, k, v):
    """Common dtype (fp32/bf16/fp16) and unit last-dim stride; other strides are passed to the kernels."""
    dt = q.dtype
    if not (k.dtype == dt and v.dtype == dt):
        dt = torch.promote_types(torch.promote_types(dt, k.dtype), v.dtype)
    if dt not in _HALF_OR_FLOAT:
        if dt == torch.float64:
            raise ValueError(
                "the Triton MHLA kernels do not support float64 inputs; use backend='torch' for float64"
            )
        raise ValueError(f"the Triton MHLA kernels support fp32, bf16 and fp16 inputs, got {dt}")
    return tuple(_unit_stride(t.to(dt)) for t in (q, k, v))


def _forward(q, k, v, mixing, block_size, normalize, normalizer, eps, scale) -> torch.Tensor:
    out_dtype = v.dtype
    q_, k_, v_ = _prepare(q, k, v)
    if q_.numel() == 0 or v_.numel() == 0:
        return torch.zeros(v.shape, dtype=out_dtype, device=v.device)
    o = K.forward(q_, k_, v_, mixing, block_size, _norm_mode(normalize, normalizer), eps, scale)
    return o.to(out_dtype)


def _backward(do, q, k, v, mixing, block_size, normalize, normalizer, eps, scale, need_dmixing):
    q_, k_, v_ = _prepare(q, k, v)
    if q_.numel() == 0 or v_.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(mixing)
    do_ = _unit_stride(do.to(v_.dtype))
    dq, dk, dv, dw = K.backward(
        do_, q_, k_, v_, mixing, block_size, _norm_mode(normalize, normalizer), eps, scale, need_dmixing
    )
    dw = torch.zeros_like(mixing) if dw is None else dw.reshape(mixing.shape).to(mixing.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw


# ------------------------------------------------------------------------------------------------
# eager path


class _MHLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mixing, block_size, normalize, normalizer, eps, scale):
        o = _forward(q, k, v, mixing, block_size, normalize, normalizer, eps, scale)
        ctx.save_for_backward(q, k, v, mixing)
        ctx.cfg = (block_size, normalize, normalizer, eps, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mixing = ctx.saved_tensors
        dq, dk, dv, dw = _backward(do, q, k, v, mixing, *ctx.cfg, ctx.needs_input_grad[3])
        return dq, dk, dv, dw, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# custom ops (torch.compile path)


@torch.library.custom_op("mhla::noncausal_fwd", mutates_args=())
def noncausal_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    normalize: bool,
    normalizer: str,
    eps: float,
    scale: float,
) -> torch.Tensor:
    """Non-causal MHLA forward on checked inputs (see `mhla_core.ops.noncausal.mhla`)."""
    return _forward(q, k, v, mixing, block_size, normalize, normalizer, eps, scale)


@noncausal_fwd.register_fake
def _(q, k, v, mixing, block_size, normalize, normalizer, eps, scale):
    return v.new_empty(v.shape)


@torch.library.custom_op("mhla::noncausal_bwd", mutates_args=())
def noncausal_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    normalize: bool,
    normalizer: str,
    eps: float,
    scale: float,
    need_dmixing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, dmixing) of `noncausal_fwd` for the output gradient `do`."""
    return _backward(do, q, k, v, mixing, block_size, normalize, normalizer, eps, scale, need_dmixing)


@noncausal_bwd.register_fake
def _(do, q, k, v, mixing, block_size, normalize, normalizer, eps, scale, need_dmixing):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), mixing.new_empty(mixing.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mixing, *cfg = inputs
    ctx.save_for_backward(q, k, v, mixing)
    ctx.cfg = tuple(cfg)


def _op_backward(ctx, do):
    q, k, v, mixing = ctx.saved_tensors
    dq, dk, dv, dw = torch.ops.mhla.noncausal_bwd(do, q, k, v, mixing, *ctx.cfg, ctx.needs_input_grad[3])
    return dq, dk, dv, dw, None, None, None, None, None


noncausal_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def mhla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    block_size: int,
    normalize: bool = True,
    normalizer: str = "exact",
    eps: float = 1e-6,
    scale: float = 1.0,
) -> torch.Tensor:
    """Non-causal MHLA with the Triton kernels; same arguments and result as `mhla_naive`."""
    args = (q, k, v, mixing, int(block_size), bool(normalize), str(normalizer), float(eps), float(scale))
    if torch.compiler.is_compiling():
        return torch.ops.mhla.noncausal_fwd(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mixing)):
        return _MHLAFunction.apply(*args)
    return _forward(*args)  # inference: skip the autograd bookkeeping


__all__ = ["mhla_triton", "noncausal_fwd", "noncausal_bwd"]
