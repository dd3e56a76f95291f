"""Pure-PyTorch non-causal MHLA (docs/spec.md section 1): the reference every kernel must match."""

from __future__ import annotations

import torch

from mhla_core.ops.utils import accumulation_dtype, expand_mixing


def naive_mhla(
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
    """Non-causal MHLA on checked inputs; q, k, v are [B, M * L, H, D] in block-major order.

    Block j's state is S_j = sum_t k_t v_t^T and z_j = sum_t k_t; query block i reads
    S~_i = sum_j W[i, j] S_j, normalised by the exact or the reference denominator.
    """
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    L = block_size
    M = N // L
    acc = accumulation_dtype(v.dtype)
    W = expand_mixing(mixing, H).to(acc)  # [H, M, M]

    qb = q.reshape(B, M, L, H, Dk).to(acc) * scale
    kb = k.reshape(B, M, L, H, Dk).to(acc)
    vb = v.reshape(B, M, L, H, Dv).to(acc)

    states = torch.einsum("bjlhk,bjlhv->bhjkv", kb, vb)  # S_j
    mixed = torch.einsum("hij,bhjkv->bhikv", W, states)  # S~_i
    out = torch.einsum("bilhk,bhikv->bilhv", qb, mixed)
    if normalize:
        ksum = kb.sum(dim=2)  # z_j: [B, M, H, Dk]
        if normalizer == "exact":
            mixed_ksum = torch.einsum("hij,bjhk->bihk", W, ksum)  # z~_i
            den = torch.einsum("bilhk,bihk->bilh", qb, mixed_ksum)
        else:  # "reference": W applied to q_{j,w} . z_j at the same in-block position w
            per_block = torch.einsum("bjlhk,bjhk->bjlh", qb, ksum)
            den = torch.einsum("hij,bjlh->bilh", W, per_block)
        out = out / (den + eps).unsqueeze(-1)
    return out.reshape(B, N, H, Dv).to(v.dtype)
