"""The shared exponential moving average of a model's weights (fp32 shadow, FSDP-aware save and load)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

from mhla_core.checkpoint import unwrap


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a sharded DTensor (FSDP2)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t`, all-gathered if it is a DTensor (a collective: every rank calls it)."""
    return t.full_tensor() if is_dtensor(t) else t


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weight, for every floating-point entry of the state dict.

    The shadow is fp32 on the model's device (sharded like the model under FSDP). Integer buffers are not
    averaged; `module()` copies them from the model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        sd = unwrap(model).state_dict()
        self.shadow = {k: v.detach().float().clone() for k, v in sd.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (call after every optimiser step)."""
        for k, v in unwrap(model).state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as full CPU tensors; sharded entries are all-gathered, so every rank must call it."""
        return {k: full_tensor(v).detach().cpu().contiguous() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors; when sharded, rank 0's `state` is scattered (other ranks may pass {})."""
        if not any(is_dtensor(v) for v in self.shadow.values()):
            missing = sorted(set(self.shadow) - set(state))
            if missing:
                raise KeyError(f"EMA state lacks {missing[:5]}")
            for k, v in self.shadow.items():
                v.copy_(state[k])
            return
        from torch.distributed.tensor import distribute_tensor

        for k, v in self.shadow.items():
            src = (state[k] if state else torch.empty(v.shape, dtype=v.dtype)).to(v.device)
            if is_dtensor(v):
                v.copy_(distribute_tensor(src, v.device_mesh, v.placements, src_data_rank=0))
            else:
                dist.broadcast(src, 0)
                v.copy_(src)

    @torch.no_grad()
    def module(self, model: nn.Module) -> nn.Module:
        """A copy of (unsharded) `model` holding the EMA weights, in eval mode."""
        ema_model = copy.deepcopy(unwrap(model))
        sd = ema_model.state_dict()
        ema_model.load_state_dict({k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in sd.items()})
        return ema_model.eval().requires_grad_(False)
