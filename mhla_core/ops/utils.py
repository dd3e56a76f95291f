"""Shared input checks and backend selection for the MHLA ops."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
#: Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, as the tests do without a GPU)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and sums are fp32 for half inputs and fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int, scale: float | None) -> float:
    """`scale`, or `head_dim ** -0.5` when it is None."""
    return head_dim**-0.5 if scale is None else float(scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k: [B, N, H, Dk]; v: [B, N, H, Dv], all float, all on one device, head dims >= 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, N, H, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, N, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has head dim D = 0; head dims must be >= 1, got shape {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no data); move it to a real device first")
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [B, N, H, Dk], got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must share [B, N, H] with q, got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_mixing_tensor(mixing: torch.Tensor, device: torch.device | None = None) -> None:
    """`mixing` must be a float tensor on `device` (the inputs' device)."""
    if not isinstance(mixing, torch.Tensor) or not mixing.is_floating_point():
        got = mixing.dtype if isinstance(mixing, torch.Tensor) else type(mixing).__name__
        raise ValueError(f"mixing must be a float torch.Tensor, got {got}")
    if device is not None and mixing.device != device:
        raise ValueError(f"mixing is on {mixing.device}, q on {device}: move the mixing matrix to {device}")


def check_mixing(mixing: torch.Tensor, size: int, num_heads: int, what: str,
                 device: torch.device | None = None) -> None:
    """`mixing` must be a float [size, size] or per-head [num_heads, size, size] tensor on `device`."""
    check_mixing_tensor(mixing, device)
    ok_shapes = ((size, size), (num_heads, size, size))
    if tuple(mixing.shape) not in ok_shapes:
        raise ValueError(
            f"mixing must be [{size}, {size}] or [{num_heads}, {size}, {size}] for {what}, "
            f"got {tuple(mixing.shape)}"
        )


def expand_mixing(mixing: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A mixing matrix as [H, M, M] (a view for a shared matrix)."""
    if mixing.dim() == 2:
        return mixing.unsqueeze(0).expand(num_heads, *mixing.shape)
    return mixing


def resolve_backend(backend: str, device: torch.device, triton_available: bool,
                    dtype: torch.dtype = torch.float32) -> str:
    """Map "auto" to "triton" for CUDA half/fp32 inputs when kernels exist, else "torch"; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fast = device.type == "cuda" and triton_available and dtype != torch.float64
        return "triton" if fast else "torch"
    if backend == "triton" and not triton_available:
        raise NotImplementedError(
            "backend='triton' has no kernel for this op yet; use backend='torch' or 'auto'"
        )
    return backend


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a small CPU tensor to `device` without a host sync.

    A plain `.to("cuda")` of pageable memory waits for the whole stream to drain. Decoding does a few
    such copies per layer and token (sequence offsets), so that wait would serialise the host's kernel
    launches with the GPU's work. On CUDA the copy is staged through pinned memory and issued
    non-blocking; PyTorch's caching host allocator keeps the staging block alive until the copy is done.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cached_hash(self) -> int:
    """`__hash__` of a frozen config dataclass, computed once per object: configs key the per-call caches
    (plans, launch constants), and hashing their nested fields on every call cost host time. Not pickled
    (`config_getstate`): str hashes differ between processes."""
    h = self.__dict__.get("_hash")
    if h is None:
        h = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))
        object.__setattr__(self, "_hash", h)
    return h


def config_getstate(self) -> dict:
    """`__getstate__` that leaves out the cached hash."""
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a dispatch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)

