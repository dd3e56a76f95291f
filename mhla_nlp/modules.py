"""fla's LM building blocks with plain-PyTorch twins for tensors not on CUDA.

fla's fused modules are Triton-only; each subclass here keeps fla's parameters (and so the
checkpoint key names) and runs fla's kernel on CUDA tensors, an equivalent PyTorch expression
elsewhere. Rotary embeddings are computed in PyTorch on every device from explicit per-token
positions (needed for packed documents and left-padded batches); the formula is fla's
non-interleaved rotary with base 1e4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import FusedRMSNormGated as _FlaRMSNormGated
from fla.modules import GatedMLP as _FlaGatedMLP
from fla.modules import RMSNorm as _FlaRMSNorm
from torch import nn


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y


class RMSNorm(_FlaRMSNorm):
    """fla.modules.RMSNorm (optionally fused with the residual add), with a PyTorch path off CUDA."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):  # noqa: D102
        if x.is_cuda:
            return super().forward(x, residual, prenorm, residual_in_fp32)
        dtype = x.dtype
        if residual is not None:
            x = x.float() + residual.float() if residual_in_fp32 else x + residual
        y = _rms(x, self.weight, self.eps)
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.to(dtype)
        return (y, x) if prenorm else y


class FusedRMSNormGated(_FlaRMSNormGated):
    """fla.modules.FusedRMSNormGated: RMSNorm(x) * act(g), with a PyTorch path off CUDA."""

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):  # noqa: D102
        if x.is_cuda:
            return super().forward(x, g, residual, prenorm, residual_in_fp32)
        if residual is not None:
            x = x + residual
        y = _rms(x, self.weight, self.eps)
        gf = g.float()
        y = y * (torch.sigmoid(gf) if self.activation == "sigmoid" else F.silu(gf))
        y = y.to(x.dtype)
        return (y, x) if prenorm else y


class GatedMLP(_FlaGatedMLP):
    """fla.modules.GatedMLP (SwiGLU), with a PyTorch path off CUDA."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: D102
        if x.is_cuda:
            return super().forward(x, **kwargs)
        if self.hidden_act not in ("swish", "silu"):
            raise NotImplementedError(f"CPU path supports hidden_act swish/silu, got {self.hidden_act}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """Non-interleaved rotary embedding (GPT-NeoX halves) at explicit positions."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.base = dim, float(base)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _freqs_and_signs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 frequencies [D] (both halves) and signs [D] (-1 then +1), made once per device and kept in
        fp32 whatever dtype the module is cast to (a plain attribute, not a buffer)."""
        if device not in self._tables:
            inv = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
            half = self.dim // 2
            signs = torch.cat([-torch.ones(half), torch.ones(half)])
            self._tables[device] = (inv.repeat(2).to(device), signs.to(device))
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (cos, signed sin) [B, T, 1, D] of integer positions [B, T], for `rotate`."""
        freqs, signs = self._freqs_and_signs(positions.device)
        ang = positions.to(torch.float32).unsqueeze(-1).unsqueeze(-1) * freqs  # [B, T, 1, D]
        return ang.cos(), ang.sin() * signs

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated by (cos, sin) from `cos_sin`, in x.dtype:
        [x1 cos - x2 sin, x2 cos + x1 sin] for the halves x1, x2, as x cos + swap_halves(x) (+-sin)."""
        xf = x.float()
        return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D]; positions: [B, T] integer positions. Returns x rotated, in x.dtype."""
        return self.rotate(x, *self.cos_sin(positions))
