"""MHLA for class-conditional image generation: DiT with MHLA, softmax or linear attention.

    models.py            DiT-S/B/L/XL with patch 2/4/8 (`create_model("DiT-S/2", attention="mhla")`), a diffusers
                         ModelMixin (save_pretrained, gradient checkpointing, DiTPipeline-compatible forward)
    diffusion.py         the hybrid loss (MSE + variational bound); sampling with any diffusers scheduler
    data.py              the latent store (sharded .npy latents with flip pairs, memory-mapped)
    extract_features.py  ImageFolder -> latent store with a diffusers AutoencoderKL   (python -m ...)
    train.py             DDP training on a latent store, EMA, exact resume, --init-from (python -m ...)
    sample.py            grid PNG, or N images across GPUs into an ADM-evaluator .npz (python -m ...)
    fid.py               FID / Inception Score against reference statistics          (python -m ...)
    checkpoints.py       loading our checkpoints and standard or authors' DiT weights
    pipeline.py          our DiT in diffusers' DiTPipeline; checkpoint -> pipeline folder  (python -m ...)
    evaluate.py          held-out diffusion losses (noise MSE, VLB bits/dim)
    small.py             the small-scale replication on real MNIST digits           (python -m ...)
    configs/             one YAML per paper row (train.py flags), the same-block softmax baseline, the small recipe
"""
