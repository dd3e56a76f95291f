"""MHLA self-attention for diffusers' Wan transformer: a `WanAttention` subclass and its processor.

The math (the authors' `MHLA_Video_Uni` with `norm_output: false`, `rope_after: true`):

    q = relu(RMSNorm_C(W_q x)) + 1e-6,  k likewise,  v = W_v x        (fp32)
    q_r, k_r = Wan 3-axis RoPE(q), RoPE(k)                                (after the feature map)
    S_j = sum_{t in block j} k_r,t v_t^T,   S~_i = sum_j W[i, j] S_j      (blocks over (F, H, W))
    o_t = q_r,t^T S~_i                                                    (no normaliser, scale 1)
    out = W_o( RMSNorm_head(o) [* SiLU(W_g x + b_g)] )

Parameter names follow the authors' checkpoint: `g` (gate, optional), `g_norm` (per-head RMSNorm),
`block_attn.conv` (the mixing matrix stored as a [M, M, 1, 1] 1x1-conv weight).

The processor reaches every weight by calling the module that owns it (`norm_q(...)`, `g_norm(...)`,
`block_attn.conv()`), never by reading `.weight` from outside: offloading hooks (accelerate's `cpu_offload`,
diffusers' group offloading) and layerwise casting put a weight in place only while its own module runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention
from torch import nn

from mhla_core import mhla
from mhla_core.layout import cached_layout

FEATURE_EPS = 1e-6  # phi(x) = relu(x) + 1e-6, as the reference


class RotaryWithGrid(tuple):
    """Wan's `(freqs_cos, freqs_sin)` rotary tuple that also carries the latent token grid (F, H, W).

    The transformer's rope module returns this (see `MHLAWanTransformer3DModel`), so the grid reaches
    every attention processor through the ordinary `rotary_emb` argument, gradient checkpointing included.
    Hooks that move arguments keep the grid: `.to(...)` (which accelerate's `send_to_device`, used by
    `cpu_offload` and diffusers' group offloading, calls) returns a `RotaryWithGrid`, and copy / pickle
    rebuild it with its grid. A container that rebuilds it from its two tensors alone gets `grid=None`,
    which the processor reports.
    """

    grid: tuple[int, int, int] | None

    def __new__(
        cls, freqs: Iterable[torch.Tensor], grid: tuple[int, int, int] | None = None
    ) -> RotaryWithGrid:
        obj = super().__new__(cls, tuple(freqs))
        obj.grid = None if grid is None else tuple(int(g) for g in grid)
        return obj

    def __getnewargs__(self) -> tuple[tuple[torch.Tensor, ...], tuple[int, int, int] | None]:
        return tuple(self), self.grid

    def to(self, *args: Any, **kwargs: Any) -> RotaryWithGrid:
        """`Tensor.to(*args, **kwargs)` on both tensors; the grid is kept."""
        return RotaryWithGrid((t.to(*args, **kwargs) for t in self), self.grid)


def apply_wan_rope(
    x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, compute_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Wan's interleaved RoPE on x [B, N, H, D], computed in `compute_dtype` (float64 like the reference);
    returns fp32."""
    xc = x.to(compute_dtype)
    x1, x2 = xc.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2].to(x.device, compute_dtype)
    sin = freqs_sin[..., 1::2].to(x.device, compute_dtype)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.float()


class MixingWeight(nn.Module):
    """The [M, M] mixing matrix, stored as `weight` [M, M, 1, 1] (the authors' 1x1-conv layout); calling it returns W.

    Starts as the identity (each block reads only its own state); `MHLAWanTransformer3DModel` re-initialises it.
    """

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_blocks)[:, :, None, None])

    def forward(self) -> torch.Tensor:
        """W [M, M]: row i is the query block, column j the key block."""
        return self.weight[:, :, 0, 0]

    def extra_repr(self) -> str:
        return f"num_blocks={self.weight.shape[0]}"


class BlockMixing(nn.Module):
    """Holds the mixing matrix under the key `conv.weight` ([M, M, 1, 1]), as the reference's `conv(kv)` over blocks."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.conv = MixingWeight(num_blocks)

    @property
    def matrix(self) -> torch.Tensor:
        """W [M, M] (through `conv()`, so that offloading hooks put the weight in place)."""
        return self.conv()


class FP32RMSNorm(nn.RMSNorm):
    """RMSNorm over the last dim computed in fp32 (input and weight upcast); returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps)


class HeadRMSNorm(nn.RMSNorm):
    """Per-head output RMSNorm as the authors': normalise in fp32, round to the input dtype, scale by the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)
        return out if self.weight is None else out * self.weight


PRECISIONS = ("reference", "fast")


class MHLAWanAttnProcessor:
    """Processor of `MHLAWanAttention`: MHLA over block-major tokens of the (F, H, W) latent grid.

    Args:
        backend: `mhla_core.mhla` backend ("auto": Triton on CUDA).
        precision: "reference" (the authors' numerics: RoPE in float64, fp32 q, k, v into the operator) or
            "fast" (RoPE in fp32, q, k, v cast to the hidden states' dtype before the operator, whose block
            states still accumulate in fp32; for bf16 models this takes the operator's bf16 kernels).
            Both keep the q/k RMSNorm, the feature map and the output RMSNorm in fp32.
    """

    def __init__(self, backend: str = "auto", precision: str = "reference") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.backend = backend
        self.precision = precision

    def __call__(
        self,
        attn: MHLAWanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("MHLA replaces self-attention only: no encoder_hidden_states or attention_mask")
        grid = grid or getattr(rotary_emb, "grid", None)
        if grid is None:
            got = ("a RotaryWithGrid without its grid (something rebuilt the rotary tuple from its tensors alone)"
                   if isinstance(rotary_emb, RotaryWithGrid) else f"rotary_emb of type {type(rotary_emb).__name__}")
            raise ValueError(
                "MHLAWanAttention needs the latent token grid (F, H, W): run it inside MHLAWanTransformer3DModel "
                f"or pass grid=(F, H, W); got {got}"
            )
        B, N, _ = hidden_states.shape
        if math.prod(grid) != N:
            raise ValueError(f"token grid {tuple(grid)} has {math.prod(grid)} tokens, hidden_states has {N}")
        dtype = hidden_states.dtype
        if attn.fused_projections:  # after fuse_qkv_projections(): one [3C, C] linear
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        proj_dtype = v.dtype  # the projections' compute dtype (under layerwise casting: not the storage dtype)
        q = torch.relu(attn.norm_q(q)) + FEATURE_EPS  # FP32RMSNorm: fp32 out
        k = torch.relu(attn.norm_k(k)) + FEATURE_EPS
        v = v.float()
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        fast = self.precision == "fast"
        if rotary_emb is not None:
            rope_dtype = torch.float32 if fast else torch.float64
            q = apply_wan_rope(q, *rotary_emb, compute_dtype=rope_dtype)
            k = apply_wan_rope(k, *rotary_emb, compute_dtype=rope_dtype)
        if fast:
            q, k, v = (t.to(dtype) for t in (q, k, v))

        layout = cached_layout(tuple(grid), tuple(attn.block_layout))
        out = mhla(  # tokens stay in grid order: the op addresses the blocks itself
            q, k, v, attn.block_attn.conv().float(),
            layout=layout, normalize=False, scale=1.0, backend=self.backend,
        ).to(dtype)  # [B, N, H, D]

        out = attn.g_norm(out).flatten(2, 3)  # HeadRMSNorm
        if attn.g is not None:
            out = out * F.silu(attn.g(hidden_states))
        out = attn.to_out[0](out.to(proj_dtype))
        return attn.to_out[1](out)


class MHLAWanAttention(WanAttention):
    """Wan self-attention with MHLA: Wan's `to_q/k/v/out`, `norm_q/k` plus `g`, `g_norm`, `block_attn.conv`.

    Args:
        dim: model width.
        heads: attention heads.
        dim_head: head dimension.
        eps: RMSNorm epsilon of `norm_q`/`norm_k` and `g_norm`.
        block_layout: number of blocks along (frames, height, width).
        gated: add the output gate `SiLU(g(x))`.
    """

    _default_processor_cls = MHLAWanAttnProcessor
    _available_processors = [MHLAWanAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        eps: float = 1e-6,
        block_layout: tuple[int, int, int] = (3, 5, 10),
        gated: bool = False,
    ) -> None:
        super().__init__(dim=dim, heads=heads, dim_head=dim_head, eps=eps, processor=MHLAWanAttnProcessor())
        self.norm_q = FP32RMSNorm(self.inner_dim, eps=eps, elementwise_affine=True)  # same keys as Wan's RMSNorm
        self.norm_k = FP32RMSNorm(self.inner_dim, eps=eps, elementwise_affine=True)
        self.block_layout = tuple(int(b) for b in block_layout)
        self.g = nn.Linear(dim, self.inner_dim, bias=True) if gated else None
        self.g_norm = HeadRMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.block_attn = BlockMixing(math.prod(self.block_layout))
