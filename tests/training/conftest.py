"""Tiny data for the trainer tests: a random DiT latent store and a PNG class folder (no downloads, no VAE)."""

import numpy as np
import pytest

from tests.image_classification.conftest import write_folder

DIT_TINY = ["hidden_size=32", "depth=2", "num_heads=2", "block_size=4"]
VIT_TINY = ["embed_dim=32", "depth=2", "num_heads=2", "patch_size=4", "piece_size=2"]


@pytest.fixture(scope="session")
def dit_store(tmp_path_factory):
    """8 random 2-view latents [4, 8, 8] of 2 classes."""
    from mhla_dit.data import write_meta, write_shard

    root = tmp_path_factory.mktemp("dit") / "store"
    rng = np.random.default_rng(0)
    write_shard(root, 0, rng.standard_normal((8, 2, 4, 8, 8)).astype(np.float32), np.arange(8) % 2)
    write_meta(root, dict(num_images=8, num_shards=1, shape=[4, 8, 8], views=2, scale=0.18215, vae="none",
                          num_classes=2))
    return root


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("cls_images"))


def dit_flags(store, out, steps, *extra):
    return ["--data-path", str(store), "--model-kwargs", *DIT_TINY, "--global-batch-size", "4", "--max-steps",
            str(steps), "--log-interval", "1", "--workers", "0", "--device", "cpu", "--output", str(out), "--lr",
            "1e-3", "--ema-decay", "0.9", *extra]


def cls_flags(folder, out, steps, *extra):
    return ["--model", "mhla_deit_tiny_patch16_224", "--model-kwargs", *VIT_TINY, "--data-dir", str(folder),
            "--output", str(out), "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--max-steps", str(steps), "--workers", "0", "--sched-on-updates", "--log-interval", "1",
            "--device", "cpu", "--model-ema", "--eval-every", "0", "--mixup", "0.2", "--drop-path", "0.1", *extra]


LM_TINY = ["hidden_size=32", "num_hidden_layers=2", "num_heads=2", "vocab_size=40", "chunk_size=4", "max_chunks=4"]


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    from tests.nlp.helpers import make_packed

    return make_packed(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    """A tiny softmax Wan transformer (wan/) and 4 random latent clips (latents/)."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from tests.videogen.conftest import TINY_WAN

    base = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY_WAN).save_pretrained(base / "wan")
    (base / "latents").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_file({"latents": torch.randn(4, 2, 8, 12, generator=g), "text": torch.randn(3 + i, 16, generator=g)},
                  str(base / "latents" / f"{i:07d}.safetensors"))
    save_file({"text": torch.randn(1, 16, generator=g)}, str(base / "latents" / "empty.safetensors"))
    return base


def lm_flags(data, out, steps, *extra):
    return ["--data", str(data), "--output", str(out), "--model", "mhla", "--model-kwargs", *LM_TINY,
            "--batch-size", "2", "--grad-accum-steps", "2", "--max-steps", str(steps), "--warmup-steps", "1",
            "--lr", "3e-3", "--log-interval", "1", "--eval-batches", "1", "--device", "cpu", *extra]


def video_flags(base, out, steps, *extra):
    return ["--data", str(base / "latents"), "--output", str(out), "--init-wan", str(base / "wan"), "--layers",
            "hybrid", "--block-layout", "2", "2", "3", "--batch-size", "1", "--max-sequence-length", "8",
            "--warmup-steps", "2", "--lr", "1e-3", "--log-interval", "1", "--device", "cpu", "--ema-decay", "0.9",
            "--max-steps", str(steps), *extra]


def trainer_main(name: str):
    """The `main` of a trainer: dit, cls, lm or video."""
    from importlib import import_module

    return import_module({"dit": "mhla_dit", "cls": "mhla_image_classification", "lm": "mhla_nlp",
                          "video": "mhla_videogen"}[name] + ".train").main
