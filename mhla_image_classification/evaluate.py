"""Top-1 / top-5 accuracy over a loader (summed over ranks under torch.distributed)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp=None) -> dict[str, float]:
    """Return {"top1", "top5", "loss", "count"} in percent over every sample of the loader."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, count
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with amp or nullcontext():
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == targets[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                             nn.functional.cross_entropy(logits, targets, reduction="sum"),
                             torch.tensor(targets.numel(), device=device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "count": int(sums[3].item())}
