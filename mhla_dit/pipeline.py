"""Our DiT in diffusers' `DiTPipeline`: build one from a model and a VAE, or export a training checkpoint.

    python -m mhla_dit.pipeline --ckpt runs/x/last/ema.safetensors --out dit-pipe [--vae ...] [--scheduler ddim]

    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained("dit-pipe")            # mhla_dit must be importable (it holds the class)
    images = pipe(class_labels=[207, 360], num_inference_steps=50).images

DiTPipeline hands the scheduler the noise channels only (it splits the learned sigma off), decodes with
`latents / vae.config.scaling_factor` (no shift) and uses 1000 as the null class of guidance. So: the
default scheduler is DDIM on DiT's schedule (DDPM with a learned variance cannot run there), a store's
scale is written into the VAE's config, a model trained on shifted latents is refused (sample those
with `mhla_dit.sample`), and guidance (guidance_scale > 1) needs num_classes == 1000.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from diffusers import AutoencoderKL, DiTPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from mhla_dit.diffusion import SCHEDULERS, make_scheduler, noise_only_scheduler, uses_learned_variance
from mhla_dit.extract_features import latent_scaling
from mhla_dit.models import DiT


def make_pipeline(model: DiT, vae: AutoencoderKL | str, scheduler: SchedulerMixin | str = "ddim", *,
                  scale: float | None = None, shift: float | None = None,
                  id2label: dict[int, str] | None = None) -> DiTPipeline:
    """A DiTPipeline around `model` (put in eval mode) and `vae` (an AutoencoderKL, a folder or a hub id).

    scheduler: a diffusers scheduler or a `make_scheduler` name other than "ddpm" (DiTPipeline gives the
    scheduler no variance channels). scale / shift: the latents' (default: the VAE config's); a scale is
    written into the VAE's config (DiTPipeline decodes with it), a non-zero shift is refused.
    """
    if isinstance(vae, (str, Path)):
        vae = AutoencoderKL.from_pretrained(vae)
    scale, shift = latent_scaling(vae, scale, shift)
    if shift:
        raise ValueError(f"shift must be 0 for DiTPipeline, which decodes latents / scaling_factor without a shift; "
                         f"got {shift} (sample this model with mhla_dit.sample, which adds it back)")
    if isinstance(scheduler, str):
        if scheduler == "ddpm":
            raise ValueError(f"scheduler must be one of {SCHEDULERS[1:]} for DiTPipeline, got 'ddpm' (its learned "
                             "variance needs the sigma channels, which DiTPipeline splits off)")
        scheduler = make_scheduler(scheduler)
    if uses_learned_variance(scheduler):
        raise ValueError(f"scheduler {type(scheduler).__name__} with variance_type "
                         f"{scheduler.config.variance_type!r} needs the sigma channels, which DiTPipeline splits off; "
                         "use variance_type='fixed_small' or another scheduler")
    if model.config.num_classes != 1000:
        warnings.warn(f"DiTPipeline's null class is 1000 but the model's is {model.config.num_classes}: run the "
                      "pipeline with guidance_scale=1 (or sample with mhla_dit.sample)", stacklevel=2)
    if vae.config.scaling_factor != scale:
        vae.register_to_config(scaling_factor=scale)
    return DiTPipeline(transformer=model.eval(), vae=vae.eval(), scheduler=noise_only_scheduler(scheduler),
                       id2label=id2label)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a training checkpoint (.safetensors with metadata) or save_pretrained folder")
    a("--out", required=True, help="the pipeline folder to write")
    a("--vae", default=None, help="AutoencoderKL folder or hub id (default: the store's)")
    a("--scale", type=float, default=None, help="latent scale (default: the store's, else the VAE's)")
    a("--scheduler", default="ddim", choices=SCHEDULERS[1:])
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    from mhla_dit.checkpoints import load_model

    args = build_parser().parse_args(argv)
    model, meta = load_model(args.ckpt)
    data = meta.get("data", {})
    vae = args.vae or data.get("vae")
    if not vae or str(vae).lower() == "none":
        raise SystemExit("--vae is required: DiTPipeline decodes latents with an AutoencoderKL")
    scale = args.scale if args.scale is not None else data.get("scale")
    shift = data.get("shift", 0.0 if "scale" in data else None)
    make_pipeline(model, vae, args.scheduler, scale=scale, shift=shift).save_pretrained(args.out)
    print(f"wrote {args.out} (DiTPipeline: {type(model).__name__} {model.config.attention}, {args.scheduler})",
          flush=True)
    return Path(args.out)


if __name__ == "__main__":
    main()
