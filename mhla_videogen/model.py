"""`MHLAWanTransformer3DModel`: diffusers' `WanTransformer3DModel` with MHLA self-attention on chosen layers."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

# `ModelMixin` must be a name of this module: a pipeline saved with this transformer records it in model_index.json
# as ["mhla_videogen.model", "MHLAWanTransformer3DModel"], and diffusers' pipeline loader looks the loading base
# classes (`ModelMixin`, ...) up in that module to find how to load the component.
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from torch import nn

from mhla_core import BlockLayout, block_distance_mixing
from mhla_videogen.attention import MHLAWanAttention, MHLAWanAttnProcessor, RotaryWithGrid

__all__ = ["ConversionError", "MHLAWanTransformer3DModel", "ModelMixin", "resolve_layers"]

MIXING_INITS = ("distance", "reference")
REFERENCE_INIT = 1e-6  # the authors' effective start of g, g_norm and the mixing matrix (a positional slip)
MHLA_PARAMS = ("g.weight", "g.bias", "g_norm.weight", "block_attn.conv.weight")  # under blocks.{i}.attn1.
MHLA_PARAM_SUFFIXES = tuple(f"attn1.{name}" for name in MHLA_PARAMS)


class ConversionError(ValueError):
    """A state dict that does not map completely onto the target model (nothing is loaded)."""


def resolve_layers(spec: str | list[int] | tuple[int, ...] | None, num_layers: int) -> list[int]:
    """Layer indices for `spec`: "hybrid" (i % 3 != 0, the paper's 2/3), "full" (all), "none" or a list."""
    if spec is None or spec == "none":
        return []
    if spec == "hybrid":
        return [i for i in range(num_layers) if i % 3 != 0]
    if spec == "full":
        return list(range(num_layers))
    if isinstance(spec, str):
        raise ValueError(f"mhla_layers must be 'hybrid', 'full', 'none' or a list of ints, got {spec!r}")
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"mhla_layers {bad} out of range for num_layers = {num_layers}")
    return layers


class MHLAWanTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 transformer whose self-attention is MHLA on the layers `mhla_layers`.

    Takes every `WanTransformer3DModel` argument plus:
        mhla_layers: "hybrid", "full" or a list of layer indices (stored resolved, as a list).
        block_layout: blocks along (frames, height, width) of the latent token grid; default (3, 5, 10).
        mhla_gated: add the output gate `SiLU(g(x))` to the MHLA layers.
        mixing_init: "distance" (docs/spec.md section 4 `linear`; g_norm ones, g default Linear init) or
            "reference" (g, g_norm and W at 1e-6, g bias zero: what the authors' code effectively starts from).

    The token grid reaches the MHLA processors through the rotary tuple: a forward hook on `self.rope`
    returns a `RotaryWithGrid` carrying (F / p_t, H / p_h, W / p_w) of the current input.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        mhla_layers: str | list[int] = "hybrid",
        block_layout: tuple[int, int, int] = (3, 5, 10),
        mhla_gated: bool = False,
        mixing_init: str = "distance",
    ) -> None:
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        if mixing_init not in MIXING_INITS:
            raise ValueError(f"mixing_init must be one of {MIXING_INITS}, got {mixing_init!r}")
        block_layout = tuple(int(b) for b in block_layout)
        if len(block_layout) != 3 or min(block_layout) < 1:
            raise ValueError(f"block_layout must be 3 positive ints (frames, height, width), got {block_layout}")
        layers = resolve_layers(mhla_layers, num_layers)
        self.register_to_config(mhla_layers=layers, block_layout=list(block_layout))

        inner_dim = num_attention_heads * attention_head_dim
        for i in layers:
            self.blocks[i].attn1 = MHLAWanAttention(
                inner_dim, num_attention_heads, attention_head_dim, eps=eps,
                block_layout=block_layout, gated=mhla_gated,
            )
        self.init_mhla_parameters(mixing_init)
        self.rope.register_forward_hook(_attach_grid)

    @property
    def mhla_attentions(self) -> dict[int, MHLAWanAttention]:
        """Layer index -> MHLA attention module."""
        return {i: self.blocks[i].attn1 for i in self.config.mhla_layers}

    @torch.no_grad()
    def init_mhla_parameters(self, mixing_init: str = "distance") -> None:
        """(Re-)initialise only the MHLA-specific parameters (`g`, `g_norm`, `block_attn.conv`)."""
        if mixing_init not in MIXING_INITS:
            raise ValueError(f"mixing_init must be one of {MIXING_INITS}, got {mixing_init!r}")
        # "distance" keeps g's nn.Linear init from construction
        names = set(MHLA_PARAMS) if mixing_init == "reference" else {"g_norm.weight", "block_attn.conv.weight"}
        for attn in self.mhla_attentions.values():
            self._init_mhla_attention(attn, names, mixing_init)

    @torch.no_grad()
    def _init_mhla_attention(self, attn: MHLAWanAttention, names: set[str], mixing_init: str) -> None:
        """Initialise the parameters `names` (a subset of `MHLA_PARAMS`) of one MHLA attention."""
        if "block_attn.conv.weight" in names:
            w = attn.block_attn.conv.weight
            if mixing_init == "distance":
                blocks = tuple(self.config.block_layout)
                w.copy_(block_distance_mixing(BlockLayout(blocks, blocks), "linear").to(w.dtype)[:, :, None, None])
            else:
                w.fill_(REFERENCE_INIT)
        if "g_norm.weight" in names:
            attn.g_norm.weight.fill_(1.0 if mixing_init == "distance" else REFERENCE_INIT)
        if attn.g is not None and names & {"g.weight", "g.bias"}:
            if mixing_init == "distance":
                attn.g.reset_parameters()  # nn.Linear's default init, which needs weight and bias together
            else:
                attn.g.weight.fill_(REFERENCE_INIT)
                attn.g.bias.zero_()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs: Any
    ) -> MHLAWanTransformer3DModel | tuple[MHLAWanTransformer3DModel, dict[str, list]]:
        """`ModelMixin.from_pretrained`, plus: MHLA parameters that the checkpoint lacks are initialised.

        So `from_pretrained(<softmax Wan folder>, mhla_layers="hybrid")` (or an MHLA folder with more
        `mhla_layers=` than it was saved with) reuses every stored weight and starts `g`, `g_norm` and
        `block_attn.conv` of the new MHLA layers from the config's `mixing_init`, as `convert.from_wan` does.
        (diffusers itself would leave them on `meta`.) A layer whose checkpoint holds only one of `g.weight`
        and `g.bias` is refused (`ConversionError`). They stay listed in `output_loading_info`'s missing keys.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = set(info.get("missing_keys", ())) & model.mhla_state_keys()
        if missing:
            model._init_missing_mhla(missing)
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_missing_mhla(self, missing: set[str]) -> None:
        """Put the MHLA parameters `missing` (state-dict keys) on their layer's device and dtype; initialise them."""
        for i, attn in self.mhla_attentions.items():
            prefix = f"blocks.{i}.attn1."
            names = {k[len(prefix):] for k in missing if k.startswith(prefix)}
            if not names:
                continue
            if attn.g is not None and len(names & {"g.weight", "g.bias"}) == 1:
                have = ({"g.weight", "g.bias"} - names).pop()
                raise ConversionError(f"the checkpoint has {prefix}{have} but not {prefix}{(names - {have}).pop()}: "
                                      "refusing to initialise half of the gate")
            ref = attn.to_out[0].weight
            if ref.device.type == "meta":
                raise ConversionError(
                    f"cannot initialise {sorted(prefix + n for n in names)}: the layer's own weights are on 'meta' "
                    "(offloaded by device_map?); load without device_map, or build the model with "
                    "mhla_videogen.convert.from_wan(<softmax Wan folder>, layers=...) and move it afterwards"
                )
            for name in names:
                module_name, _, param_name = name.rpartition(".")
                module = attn.get_submodule(module_name)
                param = getattr(module, param_name)
                if param.device.type == "meta":
                    setattr(module, param_name, nn.Parameter(torch.empty(param.shape, device=ref.device,
                                                                         dtype=ref.dtype),
                                                             requires_grad=param.requires_grad))
            self._init_mhla_attention(attn, names, self.config.mixing_init)

    def set_mhla_precision(self, precision: str) -> None:
        """Numerics of every MHLA processor: "reference" (default) or "fast" (see `MHLAWanAttnProcessor`)."""
        for attn in self.mhla_attentions.values():
            attn.set_processor(MHLAWanAttnProcessor(attn.processor.backend, precision))

    def mhla_state_keys(self) -> set[str]:
        """Names of the parameters that a softmax Wan checkpoint lacks."""
        return {k for k in self.state_dict() if k.endswith(MHLA_PARAM_SUFFIXES)}


def _attach_grid(module: torch.nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> RotaryWithGrid:
    """Forward hook of `rope`: attach the post-patch token grid of the input to the rotary tuple."""
    _, _, f, h, w = args[0].shape
    p_t, p_h, p_w = module.patch_size
    return RotaryWithGrid(output, (f // p_t, h // p_h, w // p_w))
