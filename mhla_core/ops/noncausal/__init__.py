"""Non-causal MHLA: `mhla()` dispatches to the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import torch

from mhla_core.ops.noncausal.naive import mhla_naive
from mhla_core.ops.noncausal.plan import NoncausalConfig
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
    block_size: int,
    normalize: bool = True,
    normalizer: str = "exact",
    eps: float = 1e-6,
    scale: float | None = None,
    backend: str = "auto",
    config: NoncausalConfig | None = None,
) -> torch.Tensor:
    """Non-causal multi-head linear attention over blocks of `block_size` tokens.

    Args:
        q, k: [B, N, H, Dk], already through the feature map, in block-major token order.
        v: [B, N, H, Dv].
        mixing: [M, M] or per-head [H, M, M] with M = N / block_size.
        block_size: tokens per block L.
        normalize: divide by the (mixed) key-sum normaliser.
        normalizer: "exact" (default) or "reference" (the authors' released form), SPEC section 1.
        eps: added to the denominator.
        scale: query scale, default Dk ** -0.5.
        backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch".
        config: Triton path settings (`NoncausalConfig`: which path, tile sizes); default: the
            cost model's choice per shape.

    Returns:
        [B, N, H, Dv] in v.dtype.
    """
    check_qkv(q, k, v)
    num_blocks = check_block_size(q.shape[1], block_size)
    check_mixing(mixing, num_blocks, q.shape[2], f"N = {q.shape[1]}, block_size = {block_size}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    s = default_scale(q.shape[-1], scale)
    backend = resolve_backend(backend, q.device, mhla_triton is not None, v.dtype)
    if backend == "triton":
        return mhla_triton(q, k, v, mixing, block_size, normalize, normalizer, eps, s, config=config)
    if config is not None and not isinstance(config, NoncausalConfig):
        raise ValueError(f"config must be a NoncausalConfig or None, got {type(config).__name__}")
    return mhla_naive(q, k, v, mixing, block_size, normalize, normalizer, eps, s)


__all__ = ["mhla", "mhla_naive", "check_block_size", "NORMALIZERS", "NoncausalConfig"]
