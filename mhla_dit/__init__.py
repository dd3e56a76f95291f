"""MHLA for class-conditional image generation (to come): DiT models whose attention is the MHLA layer,
the diffusion objective, training, sampling and FID evaluation, on diffusers' VAEs and schedulers."""
