"""Causal chunked MHLA: `chunk_mhla()` for training and prefill, `fused_recurrent_mhla()` for decoding."""

from __future__ import annotations

import torch

from mhla_core.ops.causal.checks import check_cu_seqlens, check_length
from mhla_core.ops.causal.naive import naive_chunk_mhla
from mhla_core.ops.causal.recurrent import naive_recurrent_mhla
from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.utils import check_mixing, check_mixing_tensor, check_qkv, default_scale, resolve_backend

try:  # the kernels are optional: the package works without Triton
    from mhla_core.ops.causal.triton_decode import fused_recurrent_mhla_triton
    from mhla_core.ops.causal.triton_ops import chunk_mhla_triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    chunk_mhla_triton = fused_recurrent_mhla_triton = None


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    chunk_size: int,
    scale: float | None,
    initial_state: MHLAState | None,
    cu_seqlens: torch.Tensor | None,
    backend: str,
    has_kernel: bool,
) -> tuple[float, str, list[int] | None]:
    """The checks both causal ops share; returns (query scale, resolved backend, document bounds or None)."""
    check_qkv(q, k, v)
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_mixing_tensor(mixing, q.device)
    if mixing.dim() not in (2, 3) or mixing.shape[-1] != mixing.shape[-2]:
        raise ValueError(f"mixing must be [L, L] or [H, L, L], got {tuple(mixing.shape)}")
    L = mixing.shape[-1]
    check_mixing(mixing, L, q.shape[2], f"causal MHLA with {L} chunks")
    num_seqs = q.shape[0] if bounds is None else len(bounds) - 1
    if initial_state is not None:
        initial_state.check(num_seqs, q.shape[2], L, q.shape[3], v.shape[3], chunk_size, q.device)
    offsets = initial_state.offsets if initial_state is not None else (0,) * num_seqs
    lengths = [q.shape[1]] * num_seqs if bounds is None else [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    for off, n in zip(offsets, lengths):
        check_length(off + n, chunk_size, L)
    s = default_scale(q.shape[-1], scale)
    return s, resolve_backend(backend, q.device, has_kernel, v.dtype), bounds


def chunk_mhla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: MHLAState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, MHLAState | None]:
    """Causal MHLA over chunks of `chunk_size` tokens, mixed by a lower-triangular matrix.

    Args:
        q, k: [B, T, H, Dk] after the feature map; v: [B, T, H, Dv].
        mixing: [L, L] or [H, L, L]; entries above the diagonal are ignored. T may not exceed L * C.
        chunk_size: tokens per chunk C; the last chunk may be partial.
        scale: query scale, default Dk ** -0.5.
        initial_state: an `MHLAState` to continue from (a prefill's final state).
        output_final_state: also return the state after the last token.
        cu_seqlens: [N + 1] document boundaries for packed input (B must be 1); no state crosses them.
        backend: "auto", "triton" or "torch".

    Returns:
        (o [B, T, H, Dv] in v.dtype, final state or None).
    """
    s, backend, bounds = _prepare(q, k, v, mixing, chunk_size, scale, initial_state, cu_seqlens, backend,
                                  chunk_mhla_triton is not None)
    fn = chunk_mhla_triton if backend == "triton" else naive_chunk_mhla
    return fn(q, k, v, mixing, chunk_size, s, initial_state, output_final_state, bounds)


def fused_recurrent_mhla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: MHLAState | None = None,
    output_final_state: bool = False,
    backend: str = "torch",
) -> tuple[torch.Tensor, MHLAState | None]:
    """Causal MHLA one token at a time (decoding); equal to `chunk_mhla` on the same tokens.

    Args and returns as `chunk_mhla`, without packing: each batch row is one sequence,
    and sequences of one batch may sit at different offsets. `backend`: "torch" (default; PyTorch
    ops, differentiable), "triton" (one fused kernel launch per token, inference only: inputs that
    need gradients, and float64 inputs, run the PyTorch path) or "auto" (Triton on CUDA).
    """
    s, backend, _ = _prepare(q, k, v, mixing, chunk_size, scale, initial_state, None, backend,
                             fused_recurrent_mhla_triton is not None)
    if q.shape[0] == 0:
        raise ValueError(f"fused_recurrent_mhla needs at least one sequence, got q {tuple(q.shape)} (B = 0)")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, mixing))
    if backend == "triton" and not needs_grad and v.dtype != torch.float64:
        return fused_recurrent_mhla_triton(q, k, v, mixing, chunk_size, s, initial_state, output_final_state)
    return naive_recurrent_mhla(q, k, v, mixing, chunk_size, s, initial_state, output_final_state)


chunk_mhla_naive = naive_chunk_mhla  # the former name of the reference, kept as an alias

__all__ = ["chunk_mhla", "fused_recurrent_mhla", "MHLAState", "naive_chunk_mhla", "naive_recurrent_mhla",
           "chunk_mhla_naive"]
