"""The variational-bound term against an independent float64 formula; the scheduler; the sampler."""

import functools
import math

import numpy as np
import pytest
import torch

from mhla_dit.diffusion import SCHEDULERS, Diffusion, create_scheduler, make_scheduler, sample, uses_learned_variance
from mhla_dit.models import create_model

from .conftest import TINY


def _phi(x):  # the tanh approximation of the normal CDF (improved DDPM's decoder definition)
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def vb_float64(x0, xt, t, eps, v):
    """Improved DDPM's L_t (bits/dim) from scratch in numpy float64 for one sample at timestep t."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    log_beta_tilde = np.log(beta_tilde[1] if t == 0 else beta_tilde[t])  # clipped at t = 0
    mu_coef = (np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]),
               np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t]))
    x0_hat = (xt - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    mean_p = mu_coef[0] * x0_hat + mu_coef[1] * xt
    logvar_p = (v + 1) / 2 * np.log(betas[t]) + (1 - v) / 2 * log_beta_tilde
    if t > 0:
        mean_q = mu_coef[0] * x0 + mu_coef[1] * xt
        var_q, var_p = np.exp(log_beta_tilde), np.exp(logvar_p)
        kl = 0.5 * (np.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1)
        return kl.mean() / np.log(2)
    sd = np.exp(0.5 * logvar_p)
    upper = np.where(x0 > 0.999, 1.0, _phi((x0 + 1 / 255 - mean_p) / sd))
    lower = np.where(x0 < -0.999, 0.0, _phi((x0 - 1 / 255 - mean_p) / sd))
    return -np.log(np.maximum(upper - lower, 1e-12)).mean() / np.log(2)


@pytest.mark.parametrize("t", [0, 1, 2, 10, 250, 999])
def test_vb_term_matches_float64_formula(t):
    g = torch.Generator().manual_seed(t)
    shape = (3, 4, 6, 6)
    x0 = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1  # quantised data incl. both edges
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(shape, generator=g)
    eps = noise + 0.3 * torch.randn(shape, generator=g)
    v = torch.rand(shape, generator=g) * 2 - 1
    d = Diffusion()
    tt = torch.full((3,), t)
    xt = d.scheduler.add_noise(x0, noise, tt)
    got = d.vb_terms(x0, xt, tt, eps, v)
    want = [vb_float64(*(a[i].double().numpy() for a in (x0, xt)), t, eps[i].double().numpy(), v[i].double().numpy())
            for i in range(3)]
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-7), (got, want)


def test_vb_is_zero_for_the_true_posterior_and_mixed_timesteps_select_terms():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1, torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0, 5, 500, 999])
    xt = d.scheduler.add_noise(x0, noise, t)
    v = -torch.ones_like(x0)  # variance = beta~_t, the posterior's
    exact = d.vb_terms(x0, xt, t, noise, v)
    assert exact[1:].abs().max() < 1e-4 and exact[0] > 0  # KL(q || q) = 0; t = 0 is the decoder NLL
    singles = torch.cat([d.vb_terms(x0[i:i + 1], xt[i:i + 1], t[i:i + 1], noise[i:i + 1] * 1.1, v[i:i + 1])
                         for i in range(4)])
    assert torch.allclose(d.vb_terms(x0, xt, t, noise * 1.1, v), singles)


def test_hybrid_loss_is_mse_plus_vb_and_vb_only_trains_the_variance():
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, **TINY)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.1)
    model.eval()
    d = Diffusion()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    out = d.training_losses(model, x0, t, y, noise)
    pred = model(d.scheduler.add_noise(x0, noise, t), t, y).sample
    assert torch.allclose(out["mse"], ((pred[:, :4] - noise) ** 2).mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])
    eps = pred[:, :4].detach().requires_grad_()
    var = pred[:, 4:].detach().requires_grad_()
    d.vb_terms(x0, d.scheduler.add_noise(x0, noise, t), t, eps.detach(), var).sum().backward()
    assert var.grad.abs().sum() > 0


def test_scheduler_matches_dit_and_respaces_like_adm():
    s = create_scheduler()
    cfg = s.config
    assert cfg.num_train_timesteps == 1000 and cfg.beta_schedule == "linear" and cfg.variance_type == "learned_range"
    assert not cfg.clip_sample and cfg.prediction_type == "epsilon"
    assert math.isclose(s.betas[0].item(), 1e-4, rel_tol=1e-5) and math.isclose(s.betas[-1].item(), 0.02, rel_tol=1e-6)
    s.set_timesteps(250)
    assert s.timesteps.tolist() == list(range(996, -1, -4))  # ADM's space_timesteps(1000, "250")


def test_sampler_is_seeded_and_guided():
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, **TINY).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)

    def run(cfg, seed=0):
        return sample(model, torch.tensor([1, 2]), (4, 8, 8), num_steps=4, cfg_scale=cfg,
                      generator=torch.Generator().manual_seed(seed))

    a, b = run(4.0), run(4.0)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, run(1.0)) and not torch.equal(a, run(4.0, seed=1))


def _sampling_model(learn_sigma=True):
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, learn_sigma=learn_sigma, **TINY).eval()
    for name, p in model.named_parameters():
        if "adaLN" in name or "final" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _schedulers():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

    ddpm = create_scheduler().config
    return {
        **{name: (lambda name=name: make_scheduler(name)) for name in SCHEDULERS},
        # built from our DDPM config it inherits variance_type="learned_range" (diffusers then keeps 3 channels)
        "dpm-from-ddpm-config": lambda: DPMSolverMultistepScheduler.from_config(ddpm),
        "ddpm-fixed-small": lambda: DDPMScheduler.from_config(ddpm, variance_type="fixed_small"),
        "heun": lambda: HeunDiscreteScheduler.from_config(ddpm),  # two model calls a step, no generator
    }


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("name", list(_schedulers()))
def test_sample_runs_every_scheduler(name, cfg, monkeypatch):
    model, scheduler = _sampling_model(), _schedulers()[name]()
    seen, step = [], type(scheduler).step

    @functools.wraps(step)
    def recording_step(self, model_output, *a, **k):
        seen.append(model_output.shape[1])
        return step(self, model_output, *a, **k)

    monkeypatch.setattr(type(scheduler), "step", recording_step)  # the class: sample may run a copy
    z = sample(model, torch.tensor([1, 2]), (4, 8, 8), num_steps=3, cfg_scale=cfg, scheduler=scheduler,
               generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    assert seen and set(seen) == {8 if uses_learned_variance(scheduler) else 4}  # sigma split off unless used
    assert uses_learned_variance(scheduler) == (name == "ddpm")


def test_ddpm_sampling_equals_the_previous_sampler():
    """The default (DDPM, learned-range variance) gives what the sampler before any-scheduler support gave."""
    model = _sampling_model()

    def previous(y, cfg, seed, steps=4):  # the old loop: int timesteps, the full 2C output to DDPM's step
        s, gen = create_scheduler(), torch.Generator().manual_seed(seed)
        s.set_timesteps(steps)
        z = torch.randn((len(y), 4, 8, 8), generator=gen)
        yy = y
        if cfg > 1:
            z, yy = torch.cat([z, z]), torch.cat([y, torch.full_like(y, model.num_classes)])
        for t in s.timesteps:
            tt = torch.full((z.shape[0],), int(t), dtype=torch.long)
            out = model.forward_with_cfg(z, tt, yy, cfg) if cfg > 1 else model(z, tt, yy, return_dict=False)[0]
            z = s.step(out.float(), int(t), z, generator=gen).prev_sample
        return z[: len(y)]

    for cfg in (1.0, 4.0):
        y = torch.tensor([1, 2, 999])
        new = sample(model, y, (4, 8, 8), num_steps=4, cfg_scale=cfg, generator=torch.Generator().manual_seed(5))
        assert torch.equal(new, previous(y, cfg, 5))


def test_learned_variance_scheduler_needs_a_learned_sigma_model():
    with pytest.raises(ValueError, match="variance_type"):
        sample(_sampling_model(learn_sigma=False), torch.tensor([1]), (4, 8, 8), num_steps=2)
    z = sample(_sampling_model(learn_sigma=False), torch.tensor([1]), (4, 8, 8), num_steps=2,
               scheduler=make_scheduler("ddim"))
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="ddim"):
        make_scheduler("plms")


def test_user_scheduler_is_not_changed():
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler.from_config(create_scheduler().config)
    sample(_sampling_model(), torch.tensor([1]), (4, 8, 8), num_steps=2, scheduler=s)
    assert s.config.variance_type == "learned_range"  # a copy without it ran
