"""One checkpoint = one directory, committed atomically.

`{run}/checkpoints/step_00000012/` holds `model.safetensors`, `ema.safetensors` (when there is an EMA),
`state.pt` (optimiser, scheduler, loss scaler, step) and `config.yaml` (the run's config, with the model
config a resume must match). It is written as `checkpoints/.tmp-step_...`, every file and the folder are
fsynced, and only then renamed into place; `{run}/last` (a symbolic link) then moves to it and older
checkpoints are pruned. A kill at any point leaves the previous complete checkpoint (or the new one) and at
most a temporary folder, which the next save removes; `latest_checkpoint` never returns a temporary one.
Weights are checked finite before anything is written: a non-finite model never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PREFIX = "step_"


def _stage(name: str) -> None:
    """A no-op between the writes of a checkpoint; the fault-injection tests replace it to kill a save."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run: Path, step: int) -> Path:
    """The folder of the checkpoint at `step` inside run folder `run`."""
    return Path(run) / "checkpoints" / f"{PREFIX}{step:08d}"


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(run: str | os.PathLike, step: int, *, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], config: dict[str, Any], metadata: dict[str, str] | None = None,
                    keep: Callable[[int], bool] = lambda step: False) -> Path:
    """Write weights (`{name}.safetensors` per entry), `state.pt` and `config.yaml` as one checkpoint.

    Raises FloatingPointError (writing nothing) if any weight is non-finite. Older checkpoints are removed
    unless `keep(step)` is true for them. Returns the checkpoint folder.
    """
    import yaml
    from safetensors.torch import save_file

    run = Path(run)
    for name, tensors in weights.items():
        bad = nonfinite_keys(tensors)
        if bad:
            raise FloatingPointError(f"step {step}: non-finite {name} weights ({', '.join(bad[:3])}); "
                                     f"the last good checkpoint in {run} is kept")
    final = checkpoint_dir(run, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    clean_temporary(run)
    if final.exists():  # saved at this step already (the weights of one step are one): only relink
        _link_and_prune(run, final, keep)
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {**(metadata or {}), "step": str(step)}
        for name, tensors in weights.items():
            _stage(name)
            cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
            save_file(cpu, str(tmp / f"{name}.safetensors"), metadata=meta)
        _stage("state")
        torch.save({**state, "step": step}, tmp / "state.pt")
        _stage("config")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        _stage("rename")
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _link_and_prune(run, final, keep)
    return final


def _link_and_prune(run: Path, final: Path, keep: Callable[[int], bool]) -> None:
    """Point `{run}/last` at `final` (atomically), then remove older checkpoints that are not kept."""
    _stage("link")
    link, tmp_link = run / "last", run / f".last-{os.getpid()}"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(final.relative_to(run))
    os.replace(tmp_link, link)
    _stage("prune")
    for old in list_checkpoints(run):
        if old != final and not keep(step_of(old)):
            shutil.rmtree(old, ignore_errors=True)


def clean_temporary(run: str | os.PathLike) -> None:
    """Remove the temporary folders and links that an interrupted save left in `run`."""
    run = Path(run)
    for p in (run / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in run.glob(".last-*"):
        p.unlink()


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(run: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()),
                  key=step_of)


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: `path` itself if it is a checkpoint folder, else the run's newest."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


@dataclass
class Checkpoint:
    """A checkpoint read back: its folder, `state.pt` and `config.yaml`; weights are read on demand."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of `{name}.safetensors`; a clear error names an unreadable file."""
        from safetensors.torch import load_file

        file = self.path / f"{name}.safetensors"
        try:
            return load_file(str(file))
        except Exception as e:
            raise ValueError(f"checkpoint file {file} is unreadable (truncated or corrupt?): {e}") from e


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder's state and config; errors name the file that is missing or unreadable."""
    import yaml

    path = Path(path)
    files = {"state": path / "state.pt", "config": path / "config.yaml"}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {f.name} is missing")
    try:
        state = torch.load(files["state"], map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint file {files['state']} is unreadable (truncated or corrupt?): {e}") from e
    try:
        config = yaml.safe_load(files["config"].read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"checkpoint file {files['config']} is not valid YAML: {e}") from e
    return Checkpoint(path, state, config)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_same_config(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Raise ValueError naming every key where `current` differs from the checkpoint's `saved` config.

    Keys are flag names (`opt`, `model_kwargs.chunk_size`); lists and tuples compare equal."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    a, b = _flatten(saved), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]
    if diff:
        shown = "; ".join(f"--{k.split('.')[0].replace('_', '-')} ({k}): {a.get(k)!r} in the checkpoint, "
                          f"{b.get(k)!r} now" for k in diff)
        raise ValueError(f"--resume {source}: the run's model/optimiser config changed: {shown}. "
                         "Resume with the checkpoint's settings, or start a new --output")
