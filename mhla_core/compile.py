"""`--compile` for the scripts that run a model (evaluation, sampling, generation, benchmarks).

    add_compile_args(parser)                 # --compile [full|blocks], --compile-backend, --compile-mode
    model = compile_model(model, *compile_settings(args))

"full" compiles the model's forward in place (`nn.Module.compile`: the module, its attributes and its
state dict keys stay as they are; entry points that call `self(...)` run compiled). "blocks" compiles only
its repeated blocks, the
regional compilation that builds much faster on deep models: diffusers' `compile_repeated_blocks` where the
model declares `_repeated_blocks` (Wan), else every module of `model.blocks` (timm ViTs, our DiT) or of
`model.layers` / `model.model.layers` (language models), each compiled in place. The MHLA ops are custom
ops with fake implementations, so neither breaks a graph. The trainers take the same flags through
`mhla_core.training`.
"""

from __future__ import annotations

import argparse

import torch

COMPILE_CHOICES = ("none", "full", "blocks")


def add_compile_args(p: argparse.ArgumentParser, timm_spelling: bool = False) -> None:
    """--compile [full|blocks] (bare: full), --compile-backend, --compile-mode; with `timm_spelling` also
    timm's --torchcompile [BACKEND] (the same as --compile full with that backend)."""
    p.add_argument("--compile", nargs="?", const="full", default="none", choices=COMPILE_CHOICES,
                   help="torch.compile the model: 'full' (the bare flag) or its repeated 'blocks' (faster to build)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    if timm_spelling:
        p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="timm's spelling of --compile full (optionally with a backend)")


def compile_settings(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(how, backend, mode) from the flags of `add_compile_args` (timm's --torchcompile wins when given)."""
    if getattr(args, "torchcompile", None):
        return "full", args.torchcompile, args.compile_mode
    return args.compile, args.compile_backend, args.compile_mode


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: `model.blocks`, `model.layers` or `model.model.layers` (first found)."""
    for owner in (model, getattr(model, "model", None)):
        for name in ("blocks", "layers"):
            blocks = getattr(owner, name, None) if owner is not None else None
            if isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) and len(blocks):
                return list(blocks)
    return []


def compile_model(model: torch.nn.Module, how: str = "full", backend: str = "inductor",
                  mode: str | None = None) -> torch.nn.Module:
    """`model`, compiled in place as `how` says ("none", "full", "blocks"), returned for chaining."""
    if how not in COMPILE_CHOICES:
        raise ValueError(f"how must be one of {COMPILE_CHOICES}, got {how!r}")
    if how == "none":
        return model
    kwargs = {"backend": backend} if mode is None else {"backend": backend, "mode": mode}
    if how == "full":
        model.compile(**kwargs)
        return model
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(**kwargs)
        return model
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"--compile blocks: {type(model).__name__} has no repeated blocks (blocks or layers); "
                         "use --compile full")
    for block in blocks:
        block.compile(**kwargs)
    return model


__all__ = ["COMPILE_CHOICES", "add_compile_args", "compile_settings", "compile_model", "repeated_blocks"]
