"""Atomic checkpoints shared by the training scripts: safetensors weights plus a resumable state file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a model's state dict (parameters and buffers) as safetensors, atomically."""
    from safetensors.torch import save_file

    # a copy of every tensor: tied weights share storage, which safetensors refuses
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load safetensors weights into a model (unwrapping DDP / compile)."""
    from safetensors.torch import load_file

    unwrap(model).load_state_dict(load_file(str(path)), strict=strict)


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a training state (optimiser, counters, RNG) with torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by `save_state`."""
    return torch.load(path, map_location="cpu", weights_only=False)
