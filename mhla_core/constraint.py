"""The mixing constraint, honoured by every trainer: a projection after each optimiser step.

A module whose mixing matrix is constrained (the MHLA layer's "clamp01", the LM layer's [1e-5, 1] clamp and
lower triangle) calls
`register_constrained(module)` when it is built; the module's own `constrain_mixing()` is the projection.
One process-wide hook, installed on first use with `torch.optim.optimizer.register_optimizer_step_post_hook`,
runs after the `step()` of any torch optimiser (timm's, transformers' `Trainer`, accelerate's wrapped one, a
plain loop) and projects the registered modules whose mixing parameter that optimiser updates. The paper's
semantics (project after every step) hold without the training loop's help. Under DDP every rank projects
the same; under FSDP the projection is elementwise, so clamping each shard clamps the whole matrix. A
skipped fp16 step (GradScaler overflow) never calls `step()`, so nothing is projected then, as nothing moved.
`mhla_core.constrain_mixing(model)` stays the explicit call (idempotent with the hook).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_MODULES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # module -> parameter name
_HOOK = None


def register_constrained(module: nn.Module, name: str = "mixing") -> None:
    """Project `module` (its `constrain_mixing()`) after every optimiser step that updates its parameter
    `name` (the mixing matrix)."""
    if not callable(getattr(module, "constrain_mixing", None)):
        raise ValueError(f"{type(module).__name__} has no constrain_mixing() to register")
    if not isinstance(getattr(module, name, None), nn.Parameter):
        raise ValueError(f"{type(module).__name__}.{name} is not a parameter; name the mixing parameter")
    global _HOOK
    _MODULES[module] = name
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_project_after_step)


def _project_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _MODULES:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module, name in list(_MODULES.items()):
        w = getattr(module, name, None)
        if isinstance(w, torch.Tensor) and w.requires_grad and id(w) in updated:  # frozen: left as it is
            module.constrain_mixing()


__all__ = ["register_constrained"]
