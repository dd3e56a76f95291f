"""Process-group and logging set-up shared by the training scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins a process group, NCCL on CUDA
    and gloo otherwise, with one GPU per local rank; alone it returns rank 0 on `device` (default: CUDA
    when present, else CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, torch.device(device)
    local = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def init_wandb(project: str, name: str | None, out: str | Path, config: dict):
    """A wandb run, online with WANDB_API_KEY set and offline otherwise."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, name=name, dir=str(out), mode=mode, config=config)


def log_metrics(metrics: dict, log: TextIO, wandb=None, step: int | None = None) -> None:
    """One training-log record: a JSON line on stdout and in `log` (flushed), and to wandb when given."""
    line = json.dumps(metrics)
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()
    if wandb:
        wandb.log(metrics, step=step)
