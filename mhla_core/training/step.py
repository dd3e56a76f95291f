"""One optimiser update (autocast, loss scaling, accumulation, clipping), the non-finite guard, the mixing
constraint hook and activation checkpointing for models without their own switch."""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from mhla_core.checkpoint import unwrap


class NonFiniteGuard:
    """Collects `not isfinite(loss)` on the device (no host sync per step); `check` raises FloatingPointError.
    Checked at every log step and before every checkpoint, on every rank."""

    def __init__(self, device: torch.device) -> None:
        self.bad = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor) -> None:
        self.bad = torch.maximum(self.bad, (~torch.isfinite(loss.detach().float())).float())

    def check(self, step: int) -> None:
        bad = self.bad.clone()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise FloatingPointError(f"non-finite loss before update {step}; no checkpoint is written "
                                     "(the last good one is kept)")


def train_step(run, model: nn.Module, optimizer, micro_batches: Sequence[Any],
               loss_fn: Callable[[Any], dict[str, torch.Tensor]], *, clip_grad: float = 0.0,
               params: Sequence[nn.Parameter] | None = None) -> dict[str, torch.Tensor]:
    """One optimiser update over `micro_batches`: forward/backward each under autocast (gradients synced
    only on the last), loss scaling for fp16, clipping (after unscaling), the step (skipped on an fp16
    overflow). `loss_fn(batch)` returns {"loss": ..., other terms}; returns their micro-batch means
    (detached) and `grad_norm`. The loss is watched by the run's non-finite guard."""
    acc = run.accelerator
    if run.updates == 0:
        run.t0 = time.time()
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with acc.no_sync(model) if i < n - 1 else nullcontext():
            with acc.autocast():
                terms = loss_fn(batch)
            acc.backward(terms["loss"] / n)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach().float() / n
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if clip_grad:
        sums["grad_norm"] = acc.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    run.guard.observe(sums["loss"])
    run.updates += 1
    return sums


def checkpoint_blocks(blocks: Sequence[nn.Module]) -> None:
    """Activation checkpointing for models without their own switch: each block's forward is recomputed in
    the backward pass (torch.utils.checkpoint, non-reentrant)."""
    for block in blocks:  # a method bound to the block: a deep copy (the EMA model) binds to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


@torch.no_grad()
def constrain(model: nn.Module, clamp01: Sequence[torch.Tensor] = ()) -> None:
    """The mixing constraint hook, after every optimiser step: `mhla_core.constrain_mixing` on the MHLA
    layers, the model's own `constrain_mixing()` where it has one (the LM), and a [0, 1] clamp of the
    mixing tensors in `clamp01` (the video model's, whose constraint is a training flag)."""
    from mhla_core import constrain_mixing

    m = unwrap(model)
    constrain_mixing(m)
    if callable(getattr(m, "constrain_mixing", None)):
        m.constrain_mixing()
    for w in clamp01:
        w.clamp_(0.0, 1.0)
