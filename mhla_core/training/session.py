"""A training run: the accelerator, the owned run folder, the log and tracker, checkpoints and resume."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from mhla_core.checkpoint import unwrap
from mhla_core.compile import compile_model, compile_settings
from mhla_core.training.checkpoint import (
    Checkpoint,
    check_same_config,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_of,
)
from mhla_core.training.ema import EMA
from mhla_core.training.run_folder import RunLock, claim_run_folder, open_log, run_id
from mhla_core.training.step import NonFiniteGuard

AMP = {"bfloat16": "bf16", "float16": "fp16", "none": "no"}


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state (its singletons), so that the next run in this process sets its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_accelerator(args: argparse.Namespace):
    """An `accelerate.Accelerator` for `args`: joins the process group under torchrun (NCCL on CUDA, gloo on
    CPU), mixed precision from --amp-dtype on CUDA (fp16 with a GradScaler), fp32 on CPU, wandb with
    --log-wandb. Accelerate's process state is a singleton: it is reset so that runs in one process differ."""
    from accelerate import Accelerator

    _reset_accelerate()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device.startswith("cpu")
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else AMP[args.amp_dtype],
                       log_with="wandb" if getattr(args, "log_wandb", False) else None,
                       step_scheduler_with_optimizer=False)


@dataclass
class Run:
    """What a trainer holds of its run; created by `start_run`, ended by `finish`."""

    args: argparse.Namespace
    out: Path
    accelerator: Any
    config: dict[str, Any]
    resume: Checkpoint | None = None
    lock: RunLock | None = None
    log_file: Any = None
    updates: int = 0  # optimiser updates taken by this process (train_step counts them)
    t0: float = 0.0  # when the first of them began
    guard: NonFiniteGuard = field(init=False)

    def __post_init__(self) -> None:
        self.guard = NonFiniteGuard(self.device)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, metrics: dict[str, Any], step: int, check: bool = True) -> None:
        """Check the losses so far (a collective; `check=False` from one rank), then one record: stdout,
        `log.jsonl` and the tracker (main process)."""
        if check:
            self.guard.check(step)
        if self.main:
            line = json.dumps(metrics)
            print(line, flush=True)
            self.log_file.write(line + "\n")
            self.log_file.flush()
            self.accelerator.log(metrics, step=step)

    def pace(self, step: int, total: int, per_step: float = 1) -> tuple[float, float]:
        """(units per second, minutes to `total`) over this process's updates so far; `per_step` units
        (images, tokens, clips) make one update."""
        rate = self.updates * per_step / max(time.time() - self.t0, 1e-9)
        return rate, round((total - step) * per_step / max(rate, 1e-9) / 60, 1)

    def state(self, optimizer, scheduler=None) -> dict[str, Any]:
        """The training state of a checkpoint: optimiser, scheduler and loss-scaler state dicts."""
        scaler = self.accelerator.scaler
        return {"optimizer": optimizer.state_dict(), "optimizer_class": type(unwrap_opt(optimizer)).__name__,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None}

    def save(self, step: int, *, model: nn.Module, optimizer, ema: EMA | None = None, scheduler=None,
             metadata: dict[str, str] | None = None, keep: Callable[[int], bool] = lambda s: False) -> None:
        """Checkpoint model, EMA, optimiser and scheduler at `step` (call on every rank; the main one writes)."""
        weights = {"model": unwrap(model).state_dict()}
        if ema is not None:
            weights["ema"] = ema.state_dict()
        self.write(step, weights, self.state(optimizer, scheduler), metadata, keep)

    def write(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
              metadata: dict[str, str] | None = None, keep: Callable[[int], bool] = lambda s: False) -> None:
        """Write prepared weights and state as one checkpoint (after the non-finite check, on every rank)."""
        self.guard.check(step)
        if self.main:
            save_checkpoint(self.out, step, weights=weights, state=state, config=self.config, metadata=metadata,
                            keep=keep)
        if dist.is_initialized():
            dist.barrier()

    def restore(self, *, model: nn.Module, optimizer, ema: EMA | None = None, scheduler=None) -> int:
        """Load the resume checkpoint into model, EMA, optimiser, scheduler and scaler; the step to continue
        from (0 without --resume)."""
        ck = self.resume
        if ck is None:
            return 0
        unwrap(model).load_state_dict(ck.weights("model"))
        if ema is not None:
            if not ck.has("ema"):
                raise ValueError(f"--resume {ck.path}: the checkpoint has no EMA weights; drop the EMA flag")
            ema.load_state_dict(ck.weights("ema"))
        optimizer.load_state_dict(ck.state["optimizer"])
        if scheduler is not None and ck.state.get("scheduler") is not None:
            scheduler.load_state_dict(ck.state["scheduler"])
        if self.accelerator.scaler is not None and ck.state.get("scaler"):
            self.accelerator.scaler.load_state_dict(ck.state["scaler"])
        return ck.step

    def prepare(self, model: nn.Module, optimizer):
        """DDP-wrap the model (under torchrun) and wrap the optimiser for loss scaling; then --compile
        (`full`: the wrapped model; `blocks`: its repeated blocks, `mhla_core.compile`)."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        how, backend, mode = compile_settings(self.args)
        if how == "blocks":  # in place, inside the DDP wrapper
            compile_model(unwrap(model), "blocks", backend, mode)
        elif how == "full":  # around the DDP wrapper, as torch recommends; `unwrap` sees through it
            model = torch.compile(model, backend=backend, **({} if mode is None else {"mode": mode}))
        return model, optimizer

    def finish(self) -> None:
        """Close the log and tracker, release the folder lock, leave the process group."""
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.accelerator.end_training()  # the tracker (main process) and the process group
        if dist.is_initialized():
            dist.destroy_process_group()
        _reset_accelerate()


def unwrap_opt(optimizer):
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def run_folder(args: argparse.Namespace, default_name: str) -> Path:
    """--output, else runs/<--experiment or default_name>."""
    return Path(args.output or Path("runs") / (args.experiment or default_name))


def start_run(args: argparse.Namespace, accelerator, *, out: Path, project: str, config: dict[str, Any],
              frozen: dict[str, Any]) -> Run:
    """Own the run folder (refuse another run's folder unless --resume/--overwrite; lock it), find the
    --resume checkpoint and refuse one whose `frozen` config (model, optimiser kind) differs, open
    `log.jsonl`, write `config.yaml`, start the tracker (resuming its run id)."""
    config = {**_plain(config), "frozen": _plain(frozen)}
    run = Run(args, out, accelerator, config)
    if args.resume:
        source = out if args.resume is True else Path(args.resume)
        found = latest_checkpoint(source)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {source}")
        run.resume = load_checkpoint(found)
        check_same_config(run.resume.config.get("frozen", {}), config["frozen"], found)
        newer = [p for p in list_checkpoints(out) if step_of(p) > run.resume.step]
        if newer and found.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"--resume {found}: {out} holds a newer checkpoint ({newer[-1].name}); resume from "
                             "the newest (plain --resume) or start a new --output")
    if run.main:  # continuing this folder's run, or one from elsewhere into a new (or --overwrite) folder
        inside = run.resume is not None and run.resume.path.resolve().is_relative_to(out.resolve())
        run.lock = claim_run_folder(out, resume=inside, overwrite=args.overwrite)
        try:
            run.log_file = open_log(out, run.resume.step if run.resume else None)
            from mhla_core.config import dump_yaml

            dump_yaml(config, out / "config.yaml")
            if args.log_wandb:
                name = args.experiment or out.name
                accelerator.init_trackers(args.wandb_project or project, config=config, init_kwargs={"wandb": {
                    "id": run_id(out, bool(args.resume)), "resume": "allow", "name": name, "dir": str(out)}})
        except BaseException:
            run.finish()
            raise
    return run


def config_fields(config: Any) -> dict[str, Any]:
    """A transformers/diffusers model config as the fields that build the model (no `_name_or_path`, no
    library versions): what a resume must match."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and not k.endswith("_version")}


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples to lists, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value
