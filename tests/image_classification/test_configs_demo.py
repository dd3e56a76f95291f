"""Paper configs build their models; the demo's data reader and folder writer work on a stand-in file."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from mhla_core.config import parse_with_config
from mhla_core.digits import read_digits
from mhla_image_classification import demo
from mhla_image_classification.train import build_model, build_parser

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "mhla_image_classification" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path):
    args = parse_with_config(build_parser(), ["--config", str(path), "--epochs", "3"])
    assert args.epochs == 3 and args.lr == 1e-3 and args.model_ema_decay == 0.9996  # file, then CLI override
    model = build_model(args, 10)
    res = int(path.stem.rsplit("_", 1)[1])
    assert model.patch_embed.img_size[0] in (res, 256 if res == 224 else res)


def test_seven_paper_configs_and_two_baselines():
    names = {p.stem for p in CONFIGS}
    assert len(names) == 8 and {"linear_deit_tiny_224", "softmax_block_deit_tiny_224"} <= names


def test_unknown_config_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: deit_tiny_patch16_224\nlearning_rate: 1\n")
    with pytest.raises(SystemExit, match="unknown keys"):
        parse_with_config(build_parser(), ["--config", str(bad)])


def test_demo_reader_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (20, 784)), np.repeat(np.arange(10), 2)[:, None]], axis=1)
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    images, labels = read_digits(path)
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8 and (labels == rows[:, -1]).all()
    root = demo.write_image_folder(images, labels, tmp_path / "folder", val_per_class=1)
    assert len(list((root / "val").glob("*/*.png"))) == 10 and len(list((root / "train").glob("*/*.png"))) == 10
    flags = demo.demo_args("mhla-exact", root, tmp_path, epochs=1, img_size=32, patch=4, piece=2, seed=0,
                           batch_size=4, workers=0, device="cpu")
    args = build_parser().parse_args(flags)
    assert args.model_kwargs["normalizer"] == "exact" and args.model_kwargs["piece_size"] == 2
    with pytest.raises(ValueError, match="784 pixels"):
        bad = tmp_path / "bad.csv.gz"
        with gzip.open(bad, "wt") as f:
            f.write("1,2,3\n4,5,6\n")
        read_digits(bad)
