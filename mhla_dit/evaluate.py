"""Held-out diffusion losses of a DiT on a latent (or pixel) store: the offline quality measure.

For every held-out item and each of `num_timesteps` fixed, evenly spaced timesteps (0 included) with fixed
noise, the noise-prediction MSE and the variational-bound term L_t (bits/dim) are computed; the same
timesteps and noise for every model make the numbers comparable. `vlb` is the stratified estimate
T / K * sum_k L_{t_k} of the bound's sum over all T timesteps (the prior term L_T is negligible);
on pixel data in [-1, 1] it is a bound on the negative log-likelihood in bits per dimension.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from mhla_dit.diffusion import Diffusion


@torch.no_grad()
def validation_loss(model: torch.nn.Module, dataset: Dataset, *, diffusion: Diffusion | None = None,
                    num_timesteps: int = 50, batch_size: int = 256, seed: int = 0,
                    device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """{"mse", "vb", "vlb"} of `model` (eval mode, view 0 of each item) averaged over items and timesteps."""
    diffusion = diffusion or Diffusion()
    device = torch.device(device)
    T = diffusion.num_timesteps
    steps = torch.linspace(0, T - 1, num_timesteps).round().long().tolist()
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def forward(xt, t, y):
        with amp:
            return model(xt, t, y)

    gen = torch.Generator().manual_seed(seed)
    mse = vb = 0.0
    per_t = torch.zeros(num_timesteps, dtype=torch.float64)
    n = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x[:, 0].to(device), y.to(device)
        for i, t in enumerate(steps):
            noise = torch.randn(x.shape, generator=gen).to(device)
            losses = diffusion.training_losses(forward, x, torch.full_like(y, t), y, noise)
            mse += losses["mse"].double().sum().item()
            vb += losses["vb"].double().sum().item()
            per_t[i] += losses["vb"].double().sum().item()
        n += len(x)
    model.train(was_training)
    count = n * num_timesteps
    return {"mse": mse / count, "vb": vb / count, "vlb": (per_t / n).sum().item() * T / num_timesteps}
