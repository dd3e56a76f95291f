"""Tiny offline fixtures for the DiT tests: a PNG ImageFolder, a random AutoencoderKL and its latent store."""

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE_SIZE = 64  # a 4-level VAE downsamples 8x: 8x8 latents, 4x4 tokens at patch 2
TINY = dict(hidden_size=32, depth=2, num_heads=2, block_size=4)


def write_folder(root, classes=2, per_class=6, size=IMAGE_SIZE, seed=0):
    """root/<class>/*.png of random coloured images (non-square, to exercise the centre crop)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size + 8 * (i % 2), size + 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_vae(path):
    """A randomly initialised 4-level AutoencoderKL (4 latent channels), saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=IMAGE_SIZE)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def vae_path(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def latent_store(tmp_path_factory, image_folder, vae_path):
    from mhla_dit.extract_features import main

    out = tmp_path_factory.mktemp("latents") / "store"
    main(["--data-path", str(image_folder), "--out", str(out), "--vae", str(vae_path), "--image-size",
          str(IMAGE_SIZE), "--shard-size", "5", "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    return out
