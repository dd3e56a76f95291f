"""Load DiT weights: our safetensors (model built from their metadata) and standard or authors' `.pt` files.

Key remapping for `--init-from`: facebookresearch DiT names (`attn.qkv`, `attn.proj`) are ours already;
the authors' MHLA-DiT names are mapped back (`attn.to_qkv` -> `attn.qkv`, `attn.to_out.0` -> `attn.proj`,
`attn.piece_attn.conv.weight` [M, M, 1, 1] -> `attn.mixing` [M, M]). Tensors whose shape differs from the
model's (another resolution, class count or block count) are skipped and reported; the new MHLA
parameters (`attn.norm`, `attn.lepe`, `attn.mixing`) keep their initialisation and are reported missing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mhla_core.checkpoint import unwrap
from mhla_dit.models import DiT, create_model

RENAMES = ((".attn.to_qkv.", ".attn.qkv."), (".attn.to_out.0.", ".attn.proj."))
MIXING_KEY = ".attn.piece_attn.conv.weight"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pt checkpoint (its "ema", else "model", else the dict itself)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    torch.serialization.add_safe_globals([argparse.Namespace])  # the authors' checkpoints carry their args
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def remap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' MHLA-DiT / DDP / compiled key names -> ours (standard DiT names pass through)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        for old, new in RENAMES:
            key = key.replace(old, new)
        if key.endswith(MIXING_KEY):
            key, value = key[: -len(MIXING_KEY)] + ".attn.mixing", value.flatten(1)
        out[key] = value
    return out


def init_from(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a standard DiT or MHLA-DiT checkpoint non-strictly; returns missing, unexpected and mismatched keys."""
    model = unwrap(model)
    own = model.state_dict()
    state = remap_state_dict(read_state_dict(path))
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    state = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(state, strict=False)
    return {"missing": sorted(set(result.missing_keys) | set(mismatched)), "unexpected": sorted(result.unexpected_keys),
            "mismatched": mismatched}


def model_metadata(name: str, kwargs: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata that rebuilds the model (`load_model`) and names the latent store's VAE."""
    meta = {"model": name, "model_kwargs": json.dumps(kwargs)}
    if data:
        meta["data"] = json.dumps({k: data[k] for k in ("vae", "scale", "shift", "shape", "num_classes") if k in data})
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata written by `model_metadata` ({} for files without it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) if k in ("model_kwargs", "data") else v for k, v in meta.items()}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> tuple[DiT, dict]:
    """Build the model recorded in a training checkpoint's metadata and load its weights (eval mode).

    `path` may also be a `save_pretrained` folder (meta {}) or a DiTPipeline folder (its `transformer/`; meta
    names its `vae/`, whose config gives the latent scale and shift)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        pipeline = (path / "transformer" / "config.json").is_file()
        if not pipeline and not (path / "config.json").is_file():
            raise ValueError(f"{path} is neither a save_pretrained folder (config.json) nor a pipeline (transformer/)")
        model = DiT.from_pretrained(path, subfolder="transformer" if pipeline else None, **overrides)
        meta = {"data": {"vae": str(path / "vae")}} if pipeline and (path / "vae").is_dir() else {}
        return model.to(device).eval(), meta
    meta = read_metadata(path)
    if "model" not in meta:
        raise ValueError(f"{path} has no model metadata; build the model with create_model and use init_from")
    model = create_model(meta["model"], **{**meta.get("model_kwargs", {}), **overrides})
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval(), meta
