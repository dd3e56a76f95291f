"""Causal chunked MHLA: `chunk_mhla()` for training and prefill, `fused_recurrent_mhla()` for decoding,
`fused_recurrent_mhla_static()` for decoding into a preallocated state without host syncs."""

from __future__ import annotations

import torch

from mhla_core.ops.causal.checks import check_cu_seqlens, check_length
from mhla_core.ops.causal.naive import naive_chunk_mhla
from mhla_core.ops.causal.recurrent import naive_recurrent_mhla, naive_static_step_
from mhla_core.ops.causal.state import MHLAState, StaticMHLAState, mix_chunk_states
from mhla_core.ops.utils import check_mixing, check_mixing_tensor, check_qkv, default_scale, resolve_backend

try:  # the kernels are optional: the package works without Triton
    from mhla_core.ops.causal.triton_decode import fused_recurrent_mhla_static_triton, fused_recurrent_mhla_triton
    from mhla_core.ops.causal.triton_ops import chunk_mhla_triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    chunk_mhla_triton = fused_recurrent_mhla_triton = fused_recurrent_mhla_static_triton = None


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
    and sequences of one batch may sit at different offsets. The returned state keeps each sequence's mixed
    state S~_i (`MHLAState.mixed`): the next call reads it, and only a token that completes a chunk rebuilds
    it from the stored chunk states. `backend`: "torch" (default; PyTorch
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


def fused_recurrent_mhla_static(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    state: StaticMHLAState,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode T tokens of rows [0, B) of a preallocated `state`, in place; equal to `chunk_mhla` on them.

    The step reads the offsets on the device and branches on them only there, so it makes no host sync and
    keeps every buffer's address: a decode step built on it can be captured in a CUDA graph. The host checks
    only shapes and `state.max_offset` (its bound of the offsets). Inference only (no gradients).

    Args:
        q, k: [B, T, H, Dk] after the feature map; v: [B, T, H, Dv]; B <= state.batch_size.
        mixing: [L, L] or [H, L, L]; the state's chunk slots S <= L.
        state: a `StaticMHLAState` (e.g. from `StaticMHLAState.zeros` and `load_` of a prefill's state).
        scale: query scale, default Dk ** -0.5.
        backend: "auto" (Triton on CUDA), "triton" or "torch". The Triton step rebuilds a mixed state only when
            a token completes a chunk (a branch inside the kernel); the PyTorch step rebuilds it, masked,
            every token (it reads all S chunk slots per token). float64 runs the PyTorch step.

    Returns:
        o [B, T, H, Dv] in v.dtype.
    """
    check_qkv(q, k, v)
    if not isinstance(state, StaticMHLAState):
        raise ValueError(f"state must be a StaticMHLAState, got {type(state).__name__}")
    check_mixing_tensor(mixing, q.device)
    if mixing.dim() not in (2, 3) or mixing.shape[-1] != mixing.shape[-2]:
        raise ValueError(f"mixing must be [L, L] or [H, L, L], got {tuple(mixing.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    L = mixing.shape[-1]
    check_mixing(mixing, L, H, f"causal MHLA with {L} chunks")
    _, sh, S, sk, sv = state.chunk_states.shape
    if not 1 <= B <= state.batch_size or (sh, sk, sv) != (H, Dk, Dv) or S > L:
        raise ValueError(
            f"state holds [B, H, S, Dk, Dv] = {list(state.chunk_states.shape)}; q {tuple(q.shape)} and v "
            f"{tuple(v.shape)} need 1 <= B <= {state.batch_size}, H = {sh}, Dk = {sk}, Dv = {sv}, and S <= L = {L}"
        )
    if state.device != q.device:
        raise ValueError(f"state is on {state.device}, q on {q.device}: allocate the state on {q.device}")
    if state.max_offset + T > state.max_length:
        raise ValueError(
            f"decoding {T} more tokens reaches {state.max_offset + T}, past the state's num_chunks * chunk_size = "
            f"{state.num_chunks} * {state.chunk_size} = {state.max_length}; allocate it with more chunks "
            f"(max_cache_len >= {state.max_offset + T})"
        )
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, mixing)):
        raise ValueError("fused_recurrent_mhla_static is inference only: call it under torch.no_grad(), "
                         "or use fused_recurrent_mhla for gradients")
    s = default_scale(Dk, scale)
    backend = resolve_backend(backend, q.device, fused_recurrent_mhla_static_triton is not None, v.dtype)
    state.max_offset += T
    state.empty = False
    if backend == "triton" and v.dtype != torch.float64 and state.partial.dtype == torch.float32:
        return fused_recurrent_mhla_static_triton(q, k, v, mixing, state, s)
    return naive_static_step_(q, k, v, mixing, state, s)


chunk_mhla_naive = naive_chunk_mhla  # the former name of the reference, kept as an alias

__all__ = ["chunk_mhla", "fused_recurrent_mhla", "fused_recurrent_mhla_static", "MHLAState", "StaticMHLAState",
           "mix_chunk_states", "naive_chunk_mhla", "naive_recurrent_mhla", "chunk_mhla_naive"]
