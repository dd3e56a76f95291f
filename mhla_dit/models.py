"""DiT (Peebles & Xie) with a selectable attention: MHLA (default), softmax (SDPA) or linear (one block).

    from mhla_dit.models import create_model
    model = create_model("DiT-S/2")                                   # MHLA, 16-token blocks, latent 32
    model = create_model("DiT-S/2", attention="softmax")              # standard DiT (same key names)
    model = create_model("DiT-S/2", attention="softmax_mhla_block")   # SDPA inside the MHLA block (baseline)
    model = create_model("DiT-XL/2", input_size=64, block_size=64, normalizer="exact")

The model is a diffusers `ModelMixin` / `ConfigMixin`: `save_pretrained` / `DiT.from_pretrained`,
`enable_gradient_checkpointing()`, and `forward(hidden_states, timestep, class_labels)` returning
`Transformer2DModelOutput(sample=...)` (a tuple with `return_dict=False`), so it drops into diffusers'
`DiTPipeline` (`config.sample_size`, `config.in_channels`, `config.out_channels` are what it reads).

Learned sigma (2C output channels), adaLN-Zero blocks, a frozen 2-D sin-cos position embedding and
class dropout with a null class (index `num_classes`), as in DiT. The MHLA attention is the authors'
DiT recipe on `mhla_core.MHLA`: an affine LayerNorm after the adaLN modulation, qkv bias, no qk-norm,
LePE 3x3 (identity at init), output dropout 0.1, `linear` mixing initialiser, the reference normaliser,
the mixing clamped into [0, 1] by `constrain_mixing` after every optimiser step. `block_size` is the
number of tokens per block (a perfect square); a grid of at most one block per axis gives W = [[1]].
Tokens stay in row-major order: the MHLA layer permutes into blocks internally.
Parameter names follow facebookresearch DiT, so its checkpoints load into the softmax model as they
are (and into the MHLA model, which adds `attn.norm`, `attn.lepe` and `attn.mixing`; see `init_from`).
`softmax_mhla_block` is the same-block softmax baseline: the MHLA attention module with its linear
attention (feature map, blocks, mixing) replaced by softmax SDPA; everything else (the affine LayerNorm,
qkv bias, qk-norm when set, LePE, output dropout) and every parameter name but `attn.mixing` is the
MHLA DiT's, and under the same seed so is every shared initial value.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp, PatchEmbed

from mhla_core import MHLA
from mhla_core.softmax_baseline import SoftmaxBaseline

ATTENTIONS = ("mhla", "softmax", "linear", "softmax_mhla_block")
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}  # depth, width, heads
DiT_models = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for s, (d, w, h) in SIZES.items() for p in (2, 4, 8)}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (cos then sin, 256 frequencies) through a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Class embeddings; during training a label is replaced by the null class with probability `dropout`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout > 0), hidden_size)
        self.num_classes, self.dropout = num_classes, dropout

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention through SDPA (keys `qkv`, `proj`, as timm's and DiT's)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class MHLAAttention(MHLA):
    """`mhla_core.MHLA` behind its own affine LayerNorm (eps 1e-5), as in the authors' DiT attention."""

    def __init__(self, dim: int, num_heads: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        return super().forward(self.norm(x), grid)


class SoftmaxMHLABlockAttention(SoftmaxBaseline):
    """`mhla_core.softmax_baseline.SoftmaxBaseline` behind its own affine LayerNorm: the MHLA DiT attention
    module (`MHLAAttention`) with softmax SDPA in place of MHLA. Same sub-modules and names (norm, qkv,
    q_norm / k_norm, lepe, proj, proj_drop), no blocks and no mixing.

    Sub-modules are built in `MHLAAttention`'s order, so a model built under the same seed draws the same
    initial values for them.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 lepe_kernel: int | None = 3, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, lepe_kernel=lepe_kernel,
                         proj_drop=proj_drop)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: [B, N, C] tokens in row-major order of `grid` -> [B, N, C]."""
        return super().forward(self.norm(x), grid)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: attention and MLP, each behind a modulated LayerNorm and a gate."""

    def __init__(self, hidden_size: int, num_heads: int, attn: nn.Module, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), grid)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map to p * p * out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def blocks_per_axis(side: int, block_size: int) -> int:
    """Blocks along each axis of a `side` x `side` token grid for `block_size` tokens per (square) block."""
    edge = math.isqrt(block_size) if isinstance(block_size, int) and block_size > 0 else 0
    if edge * edge != block_size:
        near = [e * e for e in (max(edge, 1), edge + 1)]
        raise ValueError(f"block_size must be a perfect square number of tokens, got {block_size!r}; "
                         f"nearest: {sorted(set(near))}")
    return max(1, math.ceil(side / edge))


class DiT(ModelMixin, ConfigMixin):
    """Diffusion transformer over a latent (or pixel) grid; `forward(x, t, y).sample` -> [B, 2C or C, H, W].

    Args:
        input_size, patch_size, in_channels: the latent grid (side, patch, channels).
        sample_size, out_channels: diffusers' names, derived (input_size; C or 2C) and kept in the config
            for `DiTPipeline`; when given they must agree with input_size / in_channels / learn_sigma.
        hidden_size, depth, num_heads, mlp_ratio: the transformer.
        class_dropout_prob, num_classes: label conditioning (null class = num_classes).
        learn_sigma: predict the variance interpolation too (2C output channels).
        attention: "mhla", "softmax" (DiT's attention), "linear" (MHLA with one block, M = 1) or
            "softmax_mhla_block" (SDPA inside the MHLA attention module: the same-block baseline).
        block_size: MHLA tokens per block (a perfect square; the grid is padded where it does not divide).
        normalizer, transform, lepe_kernel, mixing_constraint, proj_drop, qkv_bias, qk_norm, backend:
            MHLA settings (proj_drop: the MHLA output dropout; the softmax attention has none, as DiT);
            softmax_mhla_block uses qkv_bias, qk_norm, lepe_kernel and proj_drop as MHLA does.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str = "mhla",
        block_size: int = 16,
        normalizer: str = "reference",
        transform: str = "linear",
        lepe_kernel: int | None = 3,
        mixing_constraint: str = "clamp01",
        proj_drop: float = 0.1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        backend: str = "auto",
        sample_size: int | None = None,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if sample_size is not None and sample_size != input_size:
            raise ValueError(f"sample_size {sample_size} must equal input_size {input_size} (or be left out)")
        out = in_channels * (2 if learn_sigma else 1)
        if out_channels is not None and out_channels != out:
            raise ValueError(f"out_channels {out_channels} must be {out} (in_channels {in_channels}, learn_sigma "
                             f"{learn_sigma}) or be left out")
        self.register_to_config(sample_size=input_size, out_channels=out)  # what DiTPipeline reads
        self.gradient_checkpointing = False
        self.in_channels, self.out_channels = in_channels, out
        self.patch_size, self.num_classes, self.attention = patch_size, num_classes, attention
        side = input_size // patch_size
        self.grid = (side, side)
        blocks = 1 if attention == "linear" else blocks_per_axis(side, block_size) if attention == "mhla" else None

        def attn() -> nn.Module:
            if attention == "softmax":
                return SoftmaxAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
            if attention == "softmax_mhla_block":
                return SoftmaxMHLABlockAttention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                                 lepe_kernel=lepe_kernel, proj_drop=proj_drop)
            return MHLAAttention(hidden_size, num_heads, grid=self.grid, blocks=(blocks, blocks), transform=transform,
                                 normalizer=normalizer, lepe_kernel=lepe_kernel, mixing_constraint=mixing_constraint,
                                 proj_drop=proj_drop, qkv_bias=qkv_bias, qk_norm=qk_norm, backend=backend)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, attn(), mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; LePE convolutions start as the identity (the authors' init); W keeps its init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size[0] % 2:
                with torch.no_grad():  # depthwise LePE: a centred delta
                    m.weight.zero_()
                    m.weight[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1
                    if m.bias is not None:
                        m.bias.zero_()
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid[0]).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p * p * C] -> [B, C, H, W]."""
        p, c, (h, w) = self.patch_size, self.out_channels, self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """hidden_states: [B, C, H, W] latents, timestep: [B] (or one for all), class_labels: [B] (the null
        class is `num_classes`) -> `Transformer2DModelOutput(sample=[B, out_channels, H, W])`, or `(sample,)`
        with `return_dict=False`. Blocks are recomputed in the backward pass after
        `enable_gradient_checkpointing()`."""
        if class_labels is None:
            raise ValueError("class_labels is required: [B] class indices (the null class is num_classes)")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        x = self.x_embedder(hidden_states) + self.pos_embed
        c = self.t_embedder(timestep) + self.y_embedder(class_labels, self.training)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, self.grid)
            else:
                x = block(x, c, self.grid)
        out = self.unpatchify(self.final_layer(x, c))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: the batch is [conditional half, null-label half] of the same latents.

        The guided noise prediction (all C channels) replaces both halves; the variance channels pass through.
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y, return_dict=False)[0]  # __call__: a compiled forward applies
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def sincos_pos_embed_2d(dim: int, side: int) -> torch.Tensor:
    """[side * side, dim] fixed 2-D sin-cos embedding (first half encodes the column, as in MAE/DiT)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([embed(cols), embed(rows)], axis=1)).float()


def create_model(name: str, **kwargs) -> DiT:
    """A DiT by registry name ("DiT-S/2", ... "DiT-XL/8"); kwargs override the size and set the attention."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(DiT_models)}")
    return DiT(**{**DiT_models[name], **kwargs})


