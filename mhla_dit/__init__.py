"""MHLA for class-conditional image generation: DiT with MHLA, softmax or linear attention.

    models.py            DiT-S/B/L/XL with patch 2/4/8 (`create_model("DiT-S/2", attention="mhla")`)
    diffusion.py         the hybrid loss (MSE + variational bound) and DDPM sampling on diffusers' DDPMScheduler
    data.py              the latent store (sharded .npy latents with flip pairs, memory-mapped)
    extract_features.py  ImageFolder -> latent store with a diffusers AutoencoderKL   (python -m ...)
    train.py             DDP training on a latent store, EMA, exact resume, --init-from (python -m ...)
    sample.py            grid PNG, or N images across GPUs into an ADM-evaluator .npz (python -m ...)
    fid.py               FID / Inception Score against reference statistics          (python -m ...)
    checkpoints.py       loading our checkpoints and standard or authors' DiT weights
    evaluate.py          held-out diffusion losses (noise MSE, VLB bits/dim)
    small.py             the small-scale replication on real MNIST digits           (python -m ...)
    configs/             one YAML per paper row (train.py flags) and the small-scale recipe
"""
