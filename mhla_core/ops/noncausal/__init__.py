"""Non-causal MHLA: `mhla()` dispatches to the Triton kernels or the PyTorch reference."""

from __future__ import annotations

from functools import partial

import torch

from mhla_core.layout import BlockLayout
from mhla_core.ops.noncausal.naive import naive_mhla
from mhla_core.ops.noncausal.plan import DEFAULT_CONFIG, NoncausalConfig, gather_in_kernel
from mhla_core.ops.noncausal.state_config import StateConfig
from mhla_core.ops.utils import check_mixing, check_qkv, default_scale, resolve_backend

NORMALIZERS = ("exact", "reference")

try:  # the kernels are optional: the package works without Triton
    from mhla_core.ops.noncausal.triton_ops import mhla_triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    mhla_triton = None


def _nearest_divisors(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = min(abs(d - target) for d in divisors)
    return [d for d in divisors if abs(d - target) == best]


def check_block_size(num_tokens: int, block_size: int) -> int:
    """Return the number of blocks M = N / L, or raise ValueError naming valid block sizes."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if num_tokens % block_size != 0:
        raise ValueError(
            f"N = {num_tokens} tokens is not a multiple of block_size = {block_size}; "
            f"nearest valid block_size: {_nearest_divisors(num_tokens, block_size)} "
            "(or pad the grid with BlockLayout)"
        )
    return num_tokens // block_size


def mhla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    *,
    block_size: int | None = None,
    layout: BlockLayout | None = None,
    normalize: bool = True,
    normalizer: str = "exact",
    eps: float = 1e-6,
    scale: float | None = None,
    backend: str = "auto",
    config: NoncausalConfig | None = None,
) -> torch.Tensor:
    """Non-causal multi-head linear attention over blocks of `block_size` tokens.

    Tokens are either in block-major order (`block_size`: block j is tokens j L .. j L + L - 1) or in
    row-major order of a token grid (`layout`): the kernels then read and write the grid order
    themselves, padding a grid the blocks do not divide with zero tokens, with no permutation copies.

    Args:
        q, k: [B, N, H, Dk], already through the feature map (any strides with a unit last one,
            e.g. a [B, H, N, D] tensor transposed).
        v: [B, N, H, Dv].
        mixing: [M, M] or per-head [H, M, M], M the number of blocks.
        block_size: tokens per block L of block-major inputs.
        layout: a `BlockLayout` whose grid holds the N tokens in row-major order (instead of block_size).
        normalize: divide by the (mixed) key-sum normaliser.
        normalizer: "exact" (default) or "reference" (the authors' released form), docs/spec.md section 1.
        eps: added to the denominator.
        scale: query scale, default Dk ** -0.5.
        backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch".
        config: Triton path settings (`NoncausalConfig`: which path, the parallel path's tiles, the
            state path's `StateConfig`); default: the cost model's choice per shape.

    Returns:
        [B, N, H, Dv] in v.dtype.
    """
    check_qkv(q, k, v)
    if layout is None:
        if block_size is None:
            raise ValueError("give block_size= (block-major tokens) or layout= (tokens in grid order)")
        num_blocks = check_block_size(q.shape[1], block_size)
        where = f"N = {q.shape[1]}, block_size = {block_size}"
    else:
        _check_layout(layout, q.shape[1], block_size)
        num_blocks, block_size, where = layout.num_blocks, layout.block_size, repr(layout)
    check_mixing(mixing, num_blocks, q.shape[2], where, q.device)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    s = default_scale(q.shape[-1], scale)
    backend = resolve_backend(backend, q.device, mhla_triton is not None, v.dtype)
    grid = layout is not None and not layout.is_block_major
    if config is not None and not isinstance(config, NoncausalConfig):
        raise ValueError(f"config must be a NoncausalConfig or None, got {type(config).__name__}")
    if backend == "triton":
        if grid and gather_in_kernel(q.shape[0], q.shape[2], num_blocks * block_size, block_size, q.shape[-1],
                                     v.shape[-1], q.element_size(), config or DEFAULT_CONFIG):
            return mhla_triton(q, k, v, mixing, block_size, normalize, normalizer, eps, s, config=config,
                               rowmap=layout.token_index(q.device))
        op = partial(mhla_triton, config=config)
    else:
        op = naive_mhla
    if not grid:
        return op(q, k, v, mixing, block_size, normalize, normalizer, eps, s)
    q, k, v = (layout.to_blocks(t) for t in (q, k, v))  # the reference order (and the faster one, see plan.py)
    return layout.from_blocks(op(q, k, v, mixing, block_size, normalize, normalizer, eps, s))


def _check_layout(layout: BlockLayout, num_tokens: int, block_size: int | None) -> None:
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a mhla_core.BlockLayout or None, got {type(layout).__name__}")
    if num_tokens != layout.num_tokens:
        raise ValueError(f"q has N = {num_tokens} tokens, {layout!r} holds {layout.num_tokens}")
    if block_size is not None and block_size != layout.block_size:
        raise ValueError(f"block_size = {block_size} disagrees with {layout!r} (block_size {layout.block_size}); "
                         "give one of them")


mhla_naive = naive_mhla  # the former name of the reference, kept as an alias

__all__ = ["mhla", "naive_mhla", "mhla_naive", "check_block_size", "NORMALIZERS", "NoncausalConfig", "StateConfig"]
