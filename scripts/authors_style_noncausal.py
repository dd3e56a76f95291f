"""The non-causal MHLA baseline in the form of the authors' released code, written here from the math.

Block states by one batched matmul, the mixing as a dense matmul over the block axis, bf16 operands
for both (as their code runs under autocast), the exact normaliser; run it under torch.compile.
`scripts/bench_ops.py` times it beside our op.
"""

from __future__ import annotations

import torch


def authors_style_mhla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixing: torch.Tensor,
                       block_size: int, eps: float = 1e-6) -> torch.Tensor:
    """q, k, v [B, N, H, D] in block-major order, mixing [M, M]; returns [B, N, H, Dv] in v.dtype."""
    B, N, H, D = q.shape
    Dv = v.shape[-1]
    M = N // block_size
    scale = D**-0.5
    qb = q.view(B, M, block_size, H, D).permute(0, 3, 1, 2, 4)  # [B, H, M, L, D]
    kb = k.view(B, M, block_size, H, D).permute(0, 3, 1, 2, 4)
    vb = v.view(B, M, block_size, H, Dv).permute(0, 3, 1, 2, 4)
    kv = torch.matmul(kb.transpose(-1, -2), vb)  # [B, H, M, D, Dv]
    w = mixing.to(q.dtype)
    mixed = torch.matmul(w, kv.reshape(B, H, M, D * Dv)).view(B, H, M, D, Dv)
    mixed_ksum = torch.matmul(w, kb.sum(dim=-2))  # [B, H, M, D]
    num = torch.matmul(qb * scale, mixed)  # [B, H, M, L, Dv]
    den = (qb.float() * scale * mixed_ksum.float().unsqueeze(-2)).sum(-1, keepdim=True) + eps
    out = (num.float() / den).to(v.dtype)
    return out.permute(0, 2, 3, 1, 4).reshape(B, N, H, Dv)
