"""FSDP2 for the video trainer: per-block `fully_shard`, and full (unsharded) checkpoints that either path resumes.

The optimiser state of a checkpoint is keyed by parameter index from DDP and by parameter name from FSDP;
`rekey_optimizer_state` converts, so DDP resumes FSDP's checkpoints and the other way round.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from mhla_core.checkpoint import unwrap
from mhla_core.training import EMA
from mhla_core.training.checkpoint import Checkpoint


def shard_model(model: nn.Module, device: torch.device, amp_dtype: str) -> nn.Module:
    """FSDP2 over all ranks: `fully_shard` each of `model.blocks`, then the root (the remaining parameters).

    On CUDA (unless `amp_dtype` is "none") the all-gathered weights are in `amp_dtype` and gradients are reduced
    in fp32; the sharded master weights stay fp32. Forward inputs are not cast (autocast picks the op dtypes as
    with DDP, and the rotary tuple that carries the token grid passes through untouched)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if device.type == "cuda" and amp_dtype != "none":
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, amp_dtype), reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def rekey_optimizer_state(state: dict, names: list[str], by_name: bool) -> dict:
    """An optimizer state dict re-keyed by parameter name (`by_name`, the FSDP checkpoints) or by index (the
    format of `Optimizer.state_dict`); `names` are the optimizer's parameters in order. Returned as is if
    already keyed that way."""
    params = [p for group in state["param_groups"] for p in group["params"]]
    if not params or isinstance(params[0], str) == by_name:
        return state
    key = dict(enumerate(names)) if by_name else {n: i for i, n in enumerate(names)}
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]]}


def param_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Names of `params` in `model`, in order."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for p in params]


def full_state(model: nn.Module, optimizer, ema: EMA | None, sharded: bool) -> tuple[dict, dict]:
    """({"model": weights, "ema": shadow}, optimiser state) as full CPU state dicts (a collective when
    `sharded`: every rank calls it; rank 0 holds the result, FSDP's optimiser state keyed by name)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        optim = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        weights, optim = unwrap(model).state_dict(), optimizer.state_dict()
    out = {"model": {k: v.contiguous() for k, v in weights.items()}}
    if ema is not None:
        out["ema"] = ema.state_dict()
    return out, optim


def restore(ck: Checkpoint, model: nn.Module, optimizer, ema: EMA | None, names: list[str], sharded: bool) -> int:
    """Load a full checkpoint into a sharded (rank 0 reads, every rank keeps its shard) or plain model, its
    optimiser (re-keyed) and EMA; returns the step."""
    main = not sharded or dist.get_rank() == 0
    weights = ck.weights("model") if main else {}
    optim = rekey_optimizer_state(ck.state["optimizer"], names, by_name=sharded) if main else {}
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, optimizer, optim, options=opts)
    else:
        unwrap(model).load_state_dict(weights)
        optimizer.load_state_dict(optim)
    if ema is not None:
        ema.load_state_dict(ck.weights("ema") if main else {})
    return ck.step
