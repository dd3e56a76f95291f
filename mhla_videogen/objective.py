"""The authors' flow-matching objective: x_t = (1 - s) x0 + s eps, target eps - x0, shifted logit-normal s."""

from __future__ import annotations

import torch

from mhla_core.training.seeding import step_seed
from mhla_videogen.data import VideoLatentDataset, batch_indices, pad_text


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Shifted flow-matching noise level: s = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def make_batch(ds: VideoLatentDataset, empty: torch.Tensor, step: int, args, rank: int, world: int, micro: int = 0):
    """(x_t, timestep, text, target) for micro-batch `micro` of `step` on `rank`; every draw (samples, caption
    dropout to the empty prompt, noise, s) is seeded by (seed, step, rank, micro)."""
    micro_step = step * args.grad_accum_steps + micro
    idx = batch_indices(micro_step, args.batch_size, rank, world, len(ds), args.seed)
    items = [ds[i] for i in idx]
    x0 = torch.stack([lat.float() for lat, _ in items])
    g = torch.Generator().manual_seed(step_seed(args.seed, step, rank, micro))
    drop = torch.rand(len(items), generator=g) < args.caption_dropout
    text = torch.stack([pad_text(empty if d else t, args.max_sequence_length).float()
                        for (_, t), d in zip(items, drop)])
    eps = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(len(items), generator=g))
    s = flow_sigmas(u, args.flow_shift)
    sv = s.view(-1, 1, 1, 1, 1)
    return (1 - sv) * x0 + sv * eps, s * 1000.0, text, eps - x0
