"""The reproduction drivers and paper configs: syntax, configs build, and dit.sh end to end at tiny size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhla_core.config import load_yaml, parse_with_config
from mhla_dit.models import create_model
from mhla_dit.train import build_parser

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "mhla_dit" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("script", ["dit.sh", "dit_small.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "reproduce" / script)], check=True)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_parse_and_build(config):
    args = parse_with_config(build_parser(), ["--config", str(config), "--data-path", "x"])
    model = create_model(args.model, **{**args.model_kwargs, "depth": 1})
    assert isinstance(model, torch.nn.Module)
    if config.stem.startswith("dit_s2"):
        assert args.model == "DiT-S/2" and args.lr == 1e-4 and args.global_batch_size == 256
        assert args.ema_decay == 0.9999 and args.epochs == 80 and args.weight_decay == 0
        want = config.stem.removeprefix("dit_s2_")
        assert model.attention == want
        if want == "mhla":
            attn = model.blocks[0].attn
            assert attn.blocks == (4, 4) and attn.normalizer == "reference" and attn.mixing_constraint == "clamp01"
        if want == "softmax_mhla_block":  # the same block as MHLA's config builds, with softmax inside
            mhla = create_model(args.model, **{**load_yaml(ROOT / "mhla_dit/configs/dit_s2_mhla.yaml")["model_kwargs"],
                                               "depth": 1})
            names = {k for k, _ in model.named_parameters()}
            assert names == {k for k, _ in mhla.named_parameters()} - {"blocks.0.attn.mixing"}


def test_dit_sh_end_to_end_tiny(image_folder, vae_path, tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "train").symlink_to(image_folder)
    env = dict(os.environ, IMAGENET=str(tmp_path / "imagenet"), PYTHON=sys.executable, GPUS="1", VAE=str(vae_path),
               LATENTS=str(tmp_path / "latents"), RUNS=str(tmp_path / "runs"), NUM_SAMPLES="3", SAMPLING_STEPS="2",
               EXTRACT_ARGS="--image-size 64 --device cpu --workers 0 --batch-size 4",
               TRAIN_ARGS="--device cpu --max-steps 2 --global-batch-size 4 --workers 0 --log-interval 1 "
                          "--model-kwargs hidden_size=32 depth=1 num_heads=2 block_size=4",
               SAMPLE_ARGS="--device cpu --per-proc-batch-size 2")
    env.pop("REF_BATCH", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce" / "dit.sh"), "mhla"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "dit_s2_mhla"
    assert (run / "last" / "ema.safetensors").is_file() and (run / "samples_cfg1.0_n3.npz").is_file()
    assert "skipping FID" in proc.stdout
    import yaml

    kwargs = yaml.safe_load((run / "config.yaml").read_text())["model_kwargs"]
    assert kwargs["attention"] == "mhla" and kwargs["normalizer"] == "reference" and kwargs["hidden_size"] == 32
