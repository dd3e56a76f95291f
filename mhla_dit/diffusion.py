"""The diffusion objective and sampler on diffusers' DDPMScheduler, plus the variational-bound term it lacks.

DiT's recipe (improved DDPM's "hybrid" loss with learned-range sigma): 1000 linear betas 1e-4 -> 0.02,
epsilon prediction, loss = MSE(eps) + L_vb, where L_vb is the KL between the true posterior
q(x_{t-1} | x_t, x_0) and the model's Gaussian p(x_{t-1} | x_t) for t > 0 and the discretised Gaussian
decoder NLL of x_0 for t = 0 (both in bits per dimension), computed with the predicted noise detached so
that L_vb trains only the variance. Noising and sampling use `diffusers.DDPMScheduler`; respaced
sampling (e.g. 250 of 1000 steps, "leading" spacing 0, 4, ..., 996) matches ADM/DiT's respacing.
`sample` also runs any other diffusers scheduler (DDIM, DPM-Solver, Euler, ...; `make_scheduler`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def create_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """DiT's schedule: linear betas (1e-4 -> 0.02 at 1000 steps), learned-range variance, no x0 clipping."""
    scale = 1000 / num_train_timesteps
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=scale * 1e-4,
                         beta_end=scale * 0.02, variance_type="learned_range", clip_sample=False,
                         prediction_type="epsilon")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by improved DDPM / ADM / DiT."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2); edge bins open."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def prediction(out: torch.Tensor | tuple | object) -> torch.Tensor:
    """The prediction in a model's output: a tensor, a `(sample,)` tuple or an output with `.sample`."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.sample


class Diffusion:
    """Posterior and learned-variance tables of a DDPMScheduler (float64), and the hybrid training loss."""

    def __init__(self, scheduler: DDPMScheduler | None = None) -> None:
        self.scheduler = scheduler or create_scheduler()
        betas = self.scheduler.betas.double()
        acp = torch.cumprod(1.0 - betas, 0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.num_timesteps = len(betas)
        self.tables = {
            "sqrt_recip_acp": torch.rsqrt(acp),
            "sqrt_recipm1_acp": torch.sqrt(1.0 / acp - 1.0),
            "post_coef_x0": betas * torch.sqrt(acp_prev) / (1.0 - acp),
            "post_coef_xt": (1.0 - acp_prev) * torch.sqrt(1.0 - betas) / (1.0 - acp),
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),  # clipped: t = 0 uses t = 1
            "log_betas": torch.log(betas),
        }
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _get(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.device not in self._on:
            self._on[t.device] = {k: v.to(t.device) for k, v in self.tables.items()}
        return self._on[t.device][name][t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._get("post_coef_x0", t, xt) * x0 + self._get("post_coef_xt", t, xt) * xt
        return mean, self._get("post_logvar", t, xt).expand_as(xt)

    def p_mean_logvar(self, eps: torch.Tensor, var_values: torch.Tensor, xt: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's p(x_{t-1} | x_t): mean from predicted noise, log-variance interpolated in [beta~_t, beta_t]."""
        frac = (var_values + 1.0) / 2.0
        logvar = frac * self._get("log_betas", t, xt) + (1.0 - frac) * self._get("post_logvar", t, xt)
        x0 = self._get("sqrt_recip_acp", t, xt) * xt - self._get("sqrt_recipm1_acp", t, xt) * eps
        return self.q_posterior(x0, xt, t)[0], logvar

    def vb_terms(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
        """[B] variational-bound term in bits per dimension: KL for t > 0, decoder NLL for t = 0."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar = self.p_mean_logvar(eps, var_values, xt, t)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                        y: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample {"loss", "mse", "vb"} of the hybrid objective for `model(x_t, t, y)` -> [B, 2C, H, W]
        (a tensor, or the DiT's output with `.sample`)."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.scheduler.add_noise(x0, noise, t)
        out = prediction(model(xt, t, y)).float()
        C = x0.shape[1]
        if out.shape[1] != 2 * C:
            raise ValueError(f"the hybrid loss needs a learned-sigma model with {2 * C} output channels, "
                             f"got {out.shape[1]}")
        eps, var_values = out[:, :C], out[:, C:]
        mse = ((eps - noise.float()) ** 2).flatten(1).mean(1)
        vb = self.vb_terms(x0.float(), xt.float(), t, eps.detach(), var_values)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


LEARNED_VARIANCE = ("learned", "learned_range")
SCHEDULERS = ("ddpm", "ddim", "dpm", "euler")


def make_scheduler(name: str = "ddpm", num_train_timesteps: int = 1000) -> SchedulerMixin:
    """A sampler on DiT's training schedule: "ddpm" (ancestral, learned-range variance), "ddim", "dpm"
    (DPMSolverMultistepScheduler) or "euler" (EulerDiscreteScheduler), each with diffusers' defaults otherwise."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    ddpm = create_scheduler(num_train_timesteps)
    if name == "ddpm":
        return ddpm
    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[name]
    return cls.from_config(ddpm.config, **({"variance_type": None} if name == "dpm" else {}))


def uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler.step` reads the variance channels of a learned-sigma prediction (DDPM with a
    learned variance type); every other scheduler takes the C noise channels only."""
    from diffusers import DDPMParallelScheduler

    return (isinstance(scheduler, (DDPMScheduler, DDPMParallelScheduler))
            and scheduler.config.variance_type in LEARNED_VARIANCE)


def noise_only_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A scheduler that is handed noise channels only. DPM-Solver-style schedulers built from our DDPM config
    inherit variance_type="learned_range", which makes them keep the first 3 channels of the prediction
    (diffusers assumes RGB); with the variance already split off, the same scheduler without it is exact."""
    takes_it = "variance_type" in inspect.signature(type(scheduler).__init__).parameters  # not a hidden key
    if uses_learned_variance(scheduler) or not takes_it or scheduler.config.variance_type not in LEARNED_VARIANCE:
        return scheduler
    return type(scheduler).from_config(scheduler.config, variance_type=None)


@torch.no_grad()
def sample(model: torch.nn.Module, y: torch.Tensor, shape: tuple[int, ...], *, num_steps: int = 250,
           cfg_scale: float = 1.0, scheduler: SchedulerMixin | None = None, generator: torch.Generator | None = None,
           autocast_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Latents [B, *shape] for labels y [B] with classifier-free guidance, with any diffusers scheduler.

    Default: DiT's ancestral DDPM sampler (`create_scheduler`, learned-range variance). As in `DiTPipeline`,
    the learned-sigma channels are split off before the step for every scheduler that does not use them
    (all but DDPM with a learned variance type); the initial noise is scaled by the scheduler's
    `init_noise_sigma` and the model input by `scale_model_input` (Euler-type schedulers need both).
    The null class is `model.num_classes`; with cfg_scale > 1 the batch is doubled (conditional, null).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    classes = getattr(model, "num_classes", None)
    if classes is not None and y.numel() and not bool(((y >= 0) & (y <= classes)).all()):
        raise ValueError(f"y holds labels outside 0 .. {classes} (the classes and the null class {classes}), "
                         f"got min {int(y.min())}, max {int(y.max())}")
    scheduler = noise_only_scheduler(scheduler or create_scheduler())
    learned = uses_learned_variance(scheduler)
    scheduler.set_timesteps(num_steps)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    device, n, C = y.device, y.shape[0], shape[0]
    z = torch.randn((n, *shape), generator=generator, device=device) * scheduler.init_noise_sigma
    guided = cfg_scale > 1.0
    if guided:
        z = torch.cat([z, z])
        y = torch.cat([y, torch.full_like(y, model.num_classes)])
    steps = scheduler.timesteps
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for t in steps:
        tt = torch.as_tensor(t, device=device).expand(z.shape[0])
        zin = scheduler.scale_model_input(z, t)
        with amp:
            out = model.forward_with_cfg(zin, tt, y, cfg_scale) if guided else model(zin, tt, y, return_dict=False)[0]
        if learned and out.shape[1] != 2 * C:
            raise ValueError(f"scheduler variance_type {scheduler.config.variance_type!r} needs a learned-sigma "
                             f"model ({2 * C} output channels), got {out.shape[1]}; use variance_type='fixed_small'")
        if not learned and out.shape[1] == 2 * C:
            out = out[:, :C]
        z = scheduler.step(out.float(), t, z, **step_kwargs).prev_sample
    return z[:n]
