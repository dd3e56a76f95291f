"""A tiny real ImageNet-layout folder of PNG files for the classification tests."""

import numpy as np
import pytest
from PIL import Image


def write_folder(root, classes=3, per_class=(8, 4), size=32, seed=0):
    """root/train/<c>/*.png and root/val/<c>/*.png; each class has its own mean colour plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((size, size, 3))
                base[..., c % 3] = 160
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))
