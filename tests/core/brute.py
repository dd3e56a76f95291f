"""Float64 brute force of docs/spec.md sections 1-2, written per token and sharing no code with mhla_core."""

from __future__ import annotations

import itertools

import torch


def _tiles(grid, blocks):
    tile = [-(-g // b) for g, b in zip(grid, blocks)]
    return tile


def _rowmajor(coord, shape):
    idx = 0
    for c, s in zip(coord, shape):
        idx = idx * s + c
    return idx


def token_blocks(grid, blocks):
    """For every row-major token: (block index, position inside the (padded) tile)."""
    tile = _tiles(grid, blocks)
    out = []
    for coord in itertools.product(*[range(g) for g in grid]):
        blk = _rowmajor([c // t for c, t in zip(coord, tile)], blocks)
        pos = _rowmajor([c % t for c, t in zip(coord, tile)], tile)
        out.append((blk, pos))
    return out


def brute_mhla(q, k, v, W, grid, blocks, normalize=True, normalizer="exact", eps=1e-6, scale=None):
    """Non-causal MHLA on row-major tokens [B, N, H, D] of `grid`, blocks as tiles."""
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    s = Dk**-0.5 if scale is None else scale
    info = token_blocks(grid, blocks)
    M = 1
    for b in blocks:
        M *= b
    Wh = W if W.dim() == 3 else W.unsqueeze(0).expand(H, M, M)
    out = torch.zeros(B, N, H, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = [torch.zeros(Dk, Dv, dtype=torch.float64) for _ in range(M)]
            z = [torch.zeros(Dk, dtype=torch.float64) for _ in range(M)]
            by_pos = {}
            for t, (j, w) in enumerate(info):
                S[j] = S[j] + torch.outer(k[b, t, h], v[b, t, h])
                z[j] = z[j] + k[b, t, h]
                by_pos[(j, w)] = t
            for t, (i, w) in enumerate(info):
                qt = s * q[b, t, h]
                St = sum(Wh[h, i, j] * S[j] for j in range(M))
                num = qt @ St
                if not normalize:
                    out[b, t, h] = num
                    continue
                if normalizer == "exact":
                    den = qt @ sum(Wh[h, i, j] * z[j] for j in range(M))
                else:
                    den = sum(
                        Wh[h, i, j] * ((s * q[b, by_pos[(j, w)], h]) @ z[j])
                        for j in range(M)
                        if (j, w) in by_pos
                    )
                out[b, t, h] = num / (den + eps)
    return out


def brute_causal(q, k, v, W, chunk_size, scale=None):
    """Causal chunked MHLA per token: o_t = sum_{u <= t} W[c(t), c(u)] (s q_t . k_u) v_u."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    s = Dk**-0.5 if scale is None else scale
    L = W.shape[-1]
    Wh = W if W.dim() == 3 else W.unsqueeze(0).expand(H, L, L)
    out = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                acc = torch.zeros(Dv, dtype=torch.float64)
                for u in range(t + 1):
                    acc = acc + Wh[h, t // chunk_size, u // chunk_size] * (s * q[b, t, h] @ k[b, u, h]) * v[b, u, h]
                out[b, t, h] = acc
    return out
