"""The latent store: precomputed VAE latents (with their horizontal-flip pair) and labels in .npy shards.

    root/meta.json            {"shape": [C, H, W], "views": 2, "scale": 0.18215, "vae": ..., "num_classes": ...}
    root/00000_x.npy          [n, views, C, H, W] float16/float32 (view 0 = the image, view 1 = its flip)
    root/00000_y.npy          [n] int64 labels; written last, so a shard is complete iff its labels exist

Shards are written atomically and read memory-mapped, so one copy in the page cache serves every DDP
process. `extract_features` writes ImageNet latents; `mhla_dit.small` writes digits as 1-channel pixels.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mhla_core.checkpoint import atomic_write


def shard_paths(root: str | os.PathLike, index: int) -> tuple[Path, Path]:
    """The latent and label files of shard `index`."""
    root = Path(root)
    return root / f"{index:05d}_x.npy", root / f"{index:05d}_y.npy"


def shard_done(root: str | os.PathLike, index: int) -> bool:
    return shard_paths(root, index)[1].is_file()


def write_shard(root: str | os.PathLike, index: int, x: np.ndarray, y: np.ndarray) -> None:
    """Write one shard atomically: latents [n, views, C, H, W] first, labels [n] last."""
    if x.ndim != 5 or len(x) != len(y):
        raise ValueError(f"expected latents [n, views, C, H, W] and n labels, got {x.shape} and {y.shape}")
    px, py = shard_paths(root, index)
    for path, arr in ((px, x), (py, np.asarray(y, dtype=np.int64))):
        atomic_write(path, lambda tmp, arr=arr: save_npy(tmp, arr))


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """np.save through a file object (np.save itself appends ".npy" to a temporary file's name)."""
    with open(path, "wb") as f:
        np.save(f, arr)


def write_meta(root: str | os.PathLike, meta: dict[str, Any]) -> None:
    atomic_write(Path(root) / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: write the store with `python -m mhla_dit.extract_features`")
    return json.loads(path.read_text())


class ImageLatentDataset(Dataset):
    """Memory-mapped view of a latent store: item i -> (latents [views, C, H, W] float32, label int64).

    Every shard listed in meta.json must be complete (an unfinished extraction is an error, not a subset).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.meta = read_meta(root)
        shards = range(self.meta["num_shards"])
        missing = [i for i in shards if not shard_done(root, i)]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} of {len(shards)} shards are unfinished "
                                    f"(first: {missing[0]}); rerun extract_features to complete them")
        self.x = [np.load(shard_paths(root, i)[0], mmap_mode="r") for i in shards]
        self.y = [np.load(shard_paths(root, i)[1]) for i in shards]
        self.offsets = np.cumsum([0] + [len(y) for y in self.y]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[s]
        return torch.from_numpy(np.array(self.x[s][j], dtype=np.float32)), torch.tensor(self.y[s][j])


