"""The authors' form of causal MHLA, for benchmarks only: a Python loop over chunks, fp32 states.

Issue 3 asks the Triton kernels to be >= 10x faster than "the reference-style loop under
torch.compile" at T = 2K. This re-states that form (one iteration per chunk: the intra-chunk causal
product weighted W[i, i], plus the query against sum_{j < i} W[i, j] S_j of the stored chunk
states) from the formula, with the same semantics as `mhla_core.chunk_mhla` (no normaliser, scale
Dk^-0.5, shared mixing). `bench_ops.py` compiles it with `torch.compile` for T <= 2,048, the
longest input the authors' 32 x 32 mixing allows.
"""

from __future__ import annotations

import math

import torch

LOOP_MAX_TOKENS = 2048  # the authors' L = 32 chunks of 64


def chunk_loop_mhla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixing: torch.Tensor,
                    chunk_size: int, scale: float | None = None) -> torch.Tensor:
    """o [B, T, H, Dv] of causal MHLA, one Python iteration per chunk. q, k [B, T, H, Dk]; mixing [L, L]."""
    B, T, H, Dk = q.shape
    n = math.ceil(T / chunk_size)
    if mixing.dim() != 2 or mixing.shape[0] < n:
        raise ValueError(f"need a shared [L, L] mixing with L >= {n} chunks, got {tuple(mixing.shape)}")
    scale = Dk ** -0.5 if scale is None else scale
    W = mixing.float()
    causal = torch.ones(chunk_size, chunk_size, device=q.device).tril()
    outs, states = [], []
    for i in range(n):
        sl = slice(i * chunk_size, min(T, (i + 1) * chunk_size))
        qi, ki, vi = q[:, sl].float() * scale, k[:, sl].float(), v[:, sl].float()
        c = qi.shape[1]
        scores = torch.einsum("bchk,buhk->bhcu", qi, ki) * causal[:c, :c] * W[i, i]
        oi = torch.einsum("bhcu,buhv->bchv", scores, vi)
        if states:
            mixed = torch.einsum("j,bhjkv->bhkv", W[i, :i], torch.stack(states, dim=2))
            oi = oi + torch.einsum("bchk,bhkv->bchv", qi, mixed)
        states.append(torch.einsum("bchk,bchv->bhkv", ki, vi))
        outs.append(oi)
    return torch.cat(outs, dim=1).to(v.dtype)
