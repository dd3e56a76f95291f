"""Build MHLA Wan models: from a softmax Wan (`from_wan`) or from the authors' released state dict.

CLI (released checkpoint, original Wan key names + MHLA extras, to a diffusers model folder):

    python -m mhla_videogen.convert --src model.safetensors --dst DIR [--layers hybrid|full|auto]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from mhla_videogen.model import MIXING_INITS, ConversionError, MHLAWanTransformer3DModel, resolve_layers

DEFAULT_BLOCK_LAYOUT = (3, 5, 10)
_MHLA_KEY = re.compile(r"^blocks\.(\d+)\.attn1\.(g\.weight|g\.bias|g_norm\.weight|block_attn\.conv\.weight)$")
_WAN_CONFIG_KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
    "rope_max_seq_len", "pos_embed_seq_len",
)


def wan_config(config: Mapping) -> dict:
    """The `WanTransformer3DModel` arguments of a (Wan or MHLA-Wan) config."""
    return {k: config[k] for k in _WAN_CONFIG_KEYS if k in config}


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], allow_missing: set[str] = frozenset()
                ) -> list[str]:
    """Load `state_dict` into `model` only if every key matches in name and shape.

    Keys in `allow_missing` may be absent (they keep the model's values). Raises `ConversionError` naming every
    unexpected, missing and mis-shaped key; returns the missing (allowed) keys.
    """
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    bad_missing = [k for k in missing if k not in allow_missing]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(state_dict) & set(own)) if state_dict[k].shape != own[k].shape]
    if unexpected or bad_missing or shapes:
        lines = []
        if unexpected:
            lines.append(f"{len(unexpected)} unmatched checkpoint key(s): " + ", ".join(unexpected))
        if bad_missing:
            lines.append(f"{len(bad_missing)} model key(s) missing from the checkpoint: " + ", ".join(bad_missing))
        if shapes:
            lines.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes))
        raise ConversionError("refusing a partial load:\n  " + "\n  ".join(lines))
    model.load_state_dict(state_dict, strict=False)
    return missing


def from_wan(
    wan: WanTransformer3DModel | str | os.PathLike,
    layers: str | list[int] = "hybrid",
    gated: bool = False,
    mixing_init: str = "distance",
    block_layout: tuple[int, int, int] = DEFAULT_BLOCK_LAYOUT,
    *,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> MHLAWanTransformer3DModel:
    """An MHLA Wan that reuses every weight of a softmax Wan transformer (a model, a local folder or a hub id).

    Only `g`, `g_norm` and `block_attn.conv` of the MHLA layers are new; they start from `mixing_init`
    ("distance" or "reference"). Raises `ConversionError` if anything else fails to match.
    """
    if mixing_init not in MIXING_INITS:
        raise ValueError(f"mixing_init must be one of {MIXING_INITS}, got {mixing_init!r}")
    if not isinstance(wan, torch.nn.Module):
        wan = WanTransformer3DModel.from_pretrained(wan, subfolder=subfolder, torch_dtype=torch_dtype)
    src = wan.state_dict()
    ref = next(iter(src.values()))
    model = MHLAWanTransformer3DModel.from_config(
        {**wan_config(wan.config), "mhla_layers": layers, "block_layout": list(block_layout),
         "mhla_gated": gated, "mixing_init": mixing_init}
    )
    _move(model, ref.device, torch_dtype or ref.dtype)
    expected = model.mhla_state_keys()
    missing = load_strict(model, src, allow_missing=expected)
    if set(missing) != expected:
        raise ConversionError(f"the Wan checkpoint already has MHLA keys: {sorted(expected - set(missing))}")
    return model


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        model.to(device)
    if dtype != torch.float32:  # a fresh model is fp32; only cast (and let diffusers warn) when needed
        model.to(dtype)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch (.pt/.pth/.bin) file; unwraps `state_dict`/`module`/`model` nesting."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "module", "model", "ema"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original-Wan keys (plus the MHLA extras) to diffusers' names with diffusers' own Wan mapping."""
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    return convert_wan_transformer_to_diffusers(sd)


def detect_mhla(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[int], bool, int]:
    """(MHLA layer indices, gated, number of blocks M) from diffusers-named keys.

    Gating is read from the keys (`attn1.g.weight`), not from any config: the authors' YAML says gated but
    their code does not forward it. Raises `ConversionError` if layers disagree.
    """
    found: dict[int, set[str]] = {}
    for k in state_dict:
        m = _MHLA_KEY.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    layers = sorted(found)
    if not layers:
        return [], False, 0
    gated_layers = [i for i in layers if "g.weight" in found[i]]
    if gated_layers and gated_layers != layers:
        raise ConversionError(f"gate keys only on some MHLA layers: gated {gated_layers}, MHLA {layers}")
    sizes = {tuple(state_dict[f"blocks.{i}.attn1.block_attn.conv.weight"].shape) for i in layers
             if "block_attn.conv.weight" in found[i]}
    if len(sizes) != 1:
        raise ConversionError(f"MHLA layers disagree on (or lack) the mixing matrix shape: {sorted(sizes)}")
    return layers, bool(gated_layers), sizes.pop()[0]


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """`WanTransformer3DModel` arguments read from the tensor shapes of a diffusers-named state dict.

    The head count comes from `g_norm.weight` ([head_dim]) when there is an MHLA layer, else `num_heads`
    or head dim 128 (Wan2.1).
    """
    try:
        pe = state_dict["patch_embedding.weight"]
        inner, in_ch, *patch = pe.shape
        num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        head_dims = {v.shape[0] for k, v in state_dict.items() if k.endswith("attn1.g_norm.weight")}
        if num_heads is None:
            head_dim = head_dims.pop() if len(head_dims) == 1 else 128
            num_heads = inner // head_dim
        cfg = dict(
            patch_size=tuple(patch),
            num_attention_heads=num_heads,
            attention_head_dim=inner // num_heads,
            in_channels=in_ch,
            out_channels=state_dict["proj_out.weight"].shape[0] // math.prod(patch),
            text_dim=state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            ffn_dim=state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0],
            num_layers=num_layers,
            cross_attn_norm="blocks.0.norm2.weight" in state_dict,
        )
    except (KeyError, ValueError) as e:
        raise ConversionError(f"not a Wan text-to-video transformer state dict (cannot read its shape: {e})") from e
    if inner % num_heads:
        raise ConversionError(f"width {inner} is not divisible by {num_heads} heads")
    return cfg


def convert_released(
    state_dict: Mapping[str, torch.Tensor],
    layers: str | list[int] = "auto",
    block_layout: tuple[int, int, int] | None = None,
    num_heads: int | None = None,
    dtype: torch.dtype | None = None,
) -> MHLAWanTransformer3DModel:
    """`MHLAWanTransformer3DModel` from the authors' state dict (original Wan names + MHLA extras), loaded in full.

    `layers="auto"` takes the MHLA layer set from the keys; "hybrid", "full" or a list must agree with them.
    Gating always comes from the keys. Refuses (ConversionError) any unmatched, missing or mis-shaped key.
    The model takes the checkpoint's float dtype; a checkpoint that mixes float dtypes needs `dtype`
    (nothing is cast silently).
    """
    sd = original_to_diffusers(state_dict)
    dtypes = sorted({str(v.dtype) for v in sd.values() if v.is_floating_point()})
    if dtype is None and len(dtypes) > 1:
        raise ConversionError(f"the checkpoint mixes float dtypes {dtypes}: give the model's dtype "
                              "(--dtype float32, bfloat16 or float16) to cast them to one")
    found, gated, num_blocks = detect_mhla(sd)
    cfg = infer_config(sd, num_heads)
    if layers != "auto":
        wanted = resolve_layers(layers, cfg["num_layers"])
        if wanted != found:
            raise ConversionError(f"--layers {layers!r} means layers {wanted}, the checkpoint has MHLA on {found}")
    if block_layout is None:
        if num_blocks and num_blocks != math.prod(DEFAULT_BLOCK_LAYOUT):
            raise ConversionError(
                f"the mixing matrices are {num_blocks}x{num_blocks}, not the default layout {DEFAULT_BLOCK_LAYOUT}: "
                "give the block layout (frames, height, width) explicitly"
            )
        block_layout = DEFAULT_BLOCK_LAYOUT
    elif found and math.prod(block_layout) != num_blocks:
        raise ConversionError(f"block layout {tuple(block_layout)} has {math.prod(block_layout)} blocks, "
                              f"the checkpoint's mixing matrices are {num_blocks}x{num_blocks}")
    model = MHLAWanTransformer3DModel.from_config(
        {**cfg, "mhla_layers": found, "block_layout": list(block_layout), "mhla_gated": gated,
         "mixing_init": "reference"}
    )
    _move(model, torch.device("cpu"), dtype or sd["patch_embedding.weight"].dtype)
    load_strict(model, sd)
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse a --dst that is a file, is the source's own folder, or already holds files (unless overwrite)."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"--dst {dst} is a file; give a folder for the diffusers model")
    if dst.resolve() == src.resolve().parent:
        raise ConversionError(f"--dst {dst} is the folder of --src {src}: writing there could replace the source; "
                              "give another folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"--dst {dst} is not empty; pass --overwrite to write into it anyway")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mhla_videogen.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the authors' checkpoint (.safetensors, .pt or .pth)")
    p.add_argument("--dst", required=True, help="output diffusers model folder")
    p.add_argument("--layers", default="auto", choices=["auto", "hybrid", "full"],
                   help="expected MHLA layer set (auto: read from the keys)")
    p.add_argument("--block-layout", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help=f"blocks along frames, height, width (default {DEFAULT_BLOCK_LAYOUT})")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from g_norm, else dim/128)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="model dtype (default: the checkpoint's; required when it mixes float dtypes)")
    p.add_argument("--overwrite", action="store_true", help="write into a --dst folder that is not empty")
    args = p.parse_args(argv)
    try:
        _check_destination(Path(args.src), Path(args.dst), args.overwrite)
        model = convert_released(read_state_dict(args.src), args.layers, args.block_layout, args.num_heads,
                                 DTYPES[args.dtype] if args.dtype else None)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.save_pretrained(args.dst)
    if not (Path(args.dst) / "config.json").is_file():
        print(f"error: save_pretrained wrote no config.json into {args.dst}", file=sys.stderr)
        return 1
    c = model.config
    print(f"wrote {args.dst}: {c.num_layers} layers, MHLA on {len(c.mhla_layers)} ({c.mhla_layers}), "
          f"gated={c.mhla_gated}, block layout {tuple(c.block_layout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
