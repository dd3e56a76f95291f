"""Triton backend of non-causal MHLA: custom ops `mhla::noncausal_fwd` / `mhla::noncausal_bwd`.

`mhla_triton` is what `mhla(..., backend="triton")` calls. In eager mode it runs a plain
`torch.autograd.Function` (less dispatch overhead); under `torch.compile` it calls the custom op,
which has fake implementations and a registered autograd formula, so the op never breaks a graph.
The kernels and the math are in `parallel.py` (short sequences) and `chunk.py` / `mix.py` (block states).
"""

from __future__ import annotations

import torch

from mhla_core.ops.noncausal import chunk as K
from mhla_core.ops.noncausal import parallel as P
from mhla_core.ops.noncausal.launch import block_positions
from mhla_core.ops.noncausal.mix import _mixing3
from mhla_core.ops.noncausal.plan import DEFAULT_CONFIG, PATHS, NoncausalConfig, choose_path
from mhla_core.ops.utils import as_dtype

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
    return tuple(_unit_stride(as_dtype(t, dt)) for t in (q, k, v))


def _path(q_, v_, block_size: int, n_pos: int, cfg: NoncausalConfig) -> str:
    B, _, H, DK = q_.shape
    return choose_path(B, H, n_pos, block_size, DK, v_.shape[-1], q_.element_size(), cfg)


def _forward(q, k, v, mixing, rowmap, block_size, normalize, normalizer, eps, scale, cfg):
    """(o in v.dtype, r [B * H, M L] fp32): r is the parallel path's saved 1 / denominator (unused otherwise).

    rowmap: None (tokens in block-major order) or a grid layout's `BlockLayout.token_index`.
    """
    out_dtype = v.dtype
    q_, k_, v_ = _prepare(q, k, v)
    B, _, H, _ = q.shape
    n_pos = block_positions(q, rowmap)
    norm = _norm_mode(normalize, normalizer)
    if q_.numel() and v_.numel() and _path(q_, v_, block_size, n_pos, cfg) == "parallel":
        w3, sw_h = _mixing3(mixing)
        o, r = P.forward(q_, k_, v_, w3, sw_h, block_size, norm, eps, scale, cfg.parallel, rowmap)
        return as_dtype(o, out_dtype), r
    unused = q_.new_empty((B * H, n_pos), dtype=torch.float32)  # the shape the custom op declares; never read
    if q_.numel() == 0 or v_.numel() == 0:
        return torch.zeros(v.shape, dtype=out_dtype, device=v.device), unused
    o = K.forward(q_, k_, v_, mixing, block_size, norm, eps, scale, cfg.state, rowmap)
    return as_dtype(o, out_dtype), unused


def _backward(do, q, k, v, mixing, rowmap, o, r, block_size, normalize, normalizer, eps, scale, need_dmixing,
              cfg):
    q_, k_, v_ = _prepare(q, k, v)
    if q_.numel() == 0 or v_.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(mixing)
    do_ = _unit_stride(as_dtype(do, v_.dtype))
    norm = _norm_mode(normalize, normalizer)
    if _path(q_, v_, block_size, block_positions(q, rowmap), cfg) == "parallel":
        w3, sw_h = _mixing3(mixing)
        o_ = _unit_stride(as_dtype(o, v_.dtype))
        dq, dk, dv, dw = P.backward(do_, q_, k_, v_, w3, sw_h, o_, r, block_size, norm, eps, scale,
                                    need_dmixing, cfg.parallel, rowmap)
    else:
        dq, dk, dv, dw = K.backward(do_, q_, k_, v_, mixing, block_size, norm, eps, scale, cfg.state, need_dmixing,
                                    rowmap)
    dw = torch.zeros_like(mixing) if dw is None else as_dtype(dw.reshape(mixing.shape), mixing.dtype)
    return as_dtype(dq, q.dtype), as_dtype(dk, k.dtype), as_dtype(dv, v.dtype), dw


# ------------------------------------------------------------------------------------------------
# eager path


class _MHLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mixing, rowmap, block_size, normalize, normalizer, eps, scale, cfg):
        o, r = _forward(q, k, v, mixing, rowmap, block_size, normalize, normalizer, eps, scale, cfg)
        ctx.save_for_backward(q, k, v, mixing, o, r)
        ctx.rowmap = rowmap
        ctx.args = (block_size, normalize, normalizer, eps, scale)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mixing, o, r = ctx.saved_tensors
        dq, dk, dv, dw = _backward(do, q, k, v, mixing, ctx.rowmap, o, r, *ctx.args, ctx.needs_input_grad[3],
                                   ctx.cfg)
        return dq, dk, dv, dw, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------
# custom ops (torch.compile path)


def _config_for(path: str) -> NoncausalConfig:
    return DEFAULT_CONFIG if path == DEFAULT_CONFIG.path else NoncausalConfig(path=path)


@torch.library.custom_op("mhla::noncausal_fwd", mutates_args=())
def noncausal_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    rowmap: torch.Tensor | None,
    block_size: int,
    normalize: bool,
    normalizer: str,
    eps: float,
    scale: float,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal MHLA forward on checked inputs: (o, r), r the saved normaliser of the parallel path."""
    return _forward(q, k, v, mixing, rowmap, block_size, normalize, normalizer, eps, scale, _config_for(path))


@noncausal_fwd.register_fake
def _(q, k, v, mixing, rowmap, block_size, normalize, normalizer, eps, scale, path):
    B, _, H, _ = q.shape
    return v.new_empty(v.shape), q.new_empty((B * H, block_positions(q, rowmap)), dtype=torch.float32)


@torch.library.custom_op("mhla::noncausal_bwd", mutates_args=())
def noncausal_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    rowmap: torch.Tensor | None,
    o: torch.Tensor,
    r: torch.Tensor,
    block_size: int,
    normalize: bool,
    normalizer: str,
    eps: float,
    scale: float,
    need_dmixing: bool,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, dmixing) of `noncausal_fwd` for the output gradient `do`."""
    return _backward(do, q, k, v, mixing, rowmap, o, r, block_size, normalize, normalizer, eps, scale,
                     need_dmixing, _config_for(path))


@noncausal_bwd.register_fake
def _(do, q, k, v, mixing, rowmap, o, r, block_size, normalize, normalizer, eps, scale, need_dmixing, path):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), mixing.new_empty(mixing.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mixing, rowmap, *args = inputs
    ctx.save_for_backward(q, k, v, mixing, *output)
    ctx.rowmap = rowmap
    ctx.args = tuple(args[:-1])
    ctx.path = args[-1]


def _op_backward(ctx, do, _dr):
    q, k, v, mixing, o, r = ctx.saved_tensors
    dq, dk, dv, dw = torch.ops.mhla.noncausal_bwd(
        do, q, k, v, mixing, ctx.rowmap, o, r, *ctx.args, ctx.needs_input_grad[3], ctx.path
    )
    return dq, dk, dv, dw, None, None, None, None, None, None, None


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
    config: NoncausalConfig | None = None,
    rowmap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal MHLA with the Triton kernels; same arguments and result as `mhla_naive`.

    `config` sets the path and both paths' settings (`parallel`, `state`; default `DEFAULT_CONFIG`);
    under torch.compile only its `path` is honoured (with the default settings). `rowmap` (a grid
    layout's `BlockLayout.token_index` on the inputs' device) lets q, k, v and the output stay in
    row-major grid order.
    """
    cfg = DEFAULT_CONFIG if config is None else config
    if not isinstance(cfg, NoncausalConfig):
        raise ValueError(f"config must be a NoncausalConfig or None, got {type(config).__name__}")
    args = (q, k, v, mixing, rowmap, int(block_size), bool(normalize), str(normalizer), float(eps), float(scale))
    if torch.compiler.is_compiling():
        return torch.ops.mhla.noncausal_fwd(*args, cfg.path)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mixing)):
        return _MHLAFunction.apply(*args, cfg)
    return _forward(*args, cfg)[0]  # inference: skip the autograd bookkeeping


__all__ = ["mhla_triton", "noncausal_fwd", "noncausal_bwd", "NoncausalConfig", "PATHS"]
