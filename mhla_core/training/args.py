"""The flags every trainer shares, spelled once; parsers never match abbreviated flags."""

from __future__ import annotations

import argparse

from mhla_core.compile import add_compile_args


def make_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the module docstring as help and no prefix matching (`--drop` is not `--drop-path`)."""
    return argparse.ArgumentParser(prog=prog, description=doc, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def add_training_args(p: argparse.ArgumentParser, *, seed: int = 0, output: str | None = None,
                      checkpoint_every: int = 0, log_interval: int = 100,
                      grad_checkpointing: bool | None = False, timm_spelling: bool = False) -> None:
    """Run-folder, precision, accumulation, compile, resume and tracker flags (same names in every trainer).

    `grad_checkpointing=None` leaves the flag out (a model without activation checkpointing);
    `timm_spelling` adds timm's --torchcompile [BACKEND] beside --compile [full|blocks]."""
    a = p.add_argument
    a("--config", default=None, help="YAML file of defaults (keys are the flag names with underscores)")
    a("--output", default=output, help="run folder (default: runs/<experiment or model>)")
    a("--experiment", default=None, help="run name (tracker and default --output)")
    a("--seed", type=int, default=seed)
    a("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    a("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16", "none"),
      help="autocast dtype on CUDA; float16 adds dynamic loss scaling; CPU runs in fp32")
    a("--grad-accum-steps", type=positive_int, default=1,
      help="micro-batches per optimiser step (the global batch stays the same)")
    add_compile_args(p, timm_spelling=timm_spelling)  # --compile [full|blocks], --compile-backend, --compile-mode
    if grad_checkpointing is not None:
        a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=grad_checkpointing,
          help="recompute activations in the backward pass (less memory)")
    a("--resume", nargs="?", const=True, default=None, metavar="PATH",
      help="continue from the last checkpoint of --output, or of PATH (a run or checkpoint folder)")
    a("--overwrite", action="store_true", help="replace the run that --output holds")
    a("--checkpoint-every", type=nonnegative_int, default=checkpoint_every,
      help="checkpoint every N updates (0: see the trainer's default) and at the end")
    a("--log-interval", type=positive_int, default=log_interval)
    a("--log-wandb", action="store_true",
      help="log to wandb (its own settings decide online/offline: WANDB_MODE, `wandb login`)")
    a("--wandb-project", default=None, help="wandb project (default: the trainer's)")
