"""The relative error the core tests measure against their float64 references."""

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (on x's device; ref is moved there), 0-safe for a zero ref."""
    x, ref = x.double(), ref.to(x.device).double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
