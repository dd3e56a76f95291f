"""MHLA text-to-video: Wan2.1 with MHLA self-attention on diffusers.

What exists:
- `MHLAWanAttention` / `MHLAWanAttnProcessor` (`mhla_videogen.attention`): a `WanAttention` subclass owning
  `g`, `g_norm`, `block_attn.conv` (the authors' key names) whose processor runs `mhla_core.mhla` over the
  block-major latent token grid with Wan's RoPE after the feature map, no normaliser, fp32 state math.
- `MHLAWanTransformer3DModel` (`mhla_videogen.model`): `WanTransformer3DModel` with MHLA on `mhla_layers`
  ("hybrid" = i % 3 != 0, "full"), `block_layout`, `mhla_gated`, `mixing_init`; save/from_pretrained (also from a
  softmax Wan folder), WanPipeline save/load, group/cpu offloading, layerwise casting, QKV fusion.
- `from_wan` and `python -m mhla_videogen.convert` (`mhla_videogen.convert`): softmax Wan -> MHLA, and the
  authors' released state dict -> a diffusers model folder (layer set and gating detected from the keys).

- `python -m mhla_videogen.generate` (WanPipeline + MHLA transformer -> videos), `python -m mhla_videogen.extract`
  (VAE latents + UMT5 embeddings), `python -m mhla_videogen.train` (flow-matching fine-tuning, DDP, exact resume);
  `scripts/bench_video.py`, `scripts/reproduce/wan.sh`.

Still to come (see docs/videogen.md): GPU verification, VBench.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "MHLAWanAttention": "mhla_videogen.attention",
    "MHLAWanAttnProcessor": "mhla_videogen.attention",
    "MHLAWanTransformer3DModel": "mhla_videogen.model",
    "resolve_layers": "mhla_videogen.model",
    "from_wan": "mhla_videogen.convert",
    "convert_released": "mhla_videogen.convert",
    "ConversionError": "mhla_videogen.convert",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import diffusers
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mhla_videogen' has no attribute {name!r}")
