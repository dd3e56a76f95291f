"""ImageNet-layout folders, seeded augmentation and a resumable sampler for the training script."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import ImageDataset, create_transform
from timm.data.auto_augment import AugmentOp
from torch.utils.data import DataLoader, Dataset, Sampler

from mhla_core.training.seeding import epoch_permutation

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def check_split(data_dir: str | Path, split: str) -> Path:
    """Return `data_dir/split`, or raise a clear error unless it holds class folders with images."""
    root = Path(data_dir) / split
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist (expected {data_dir}/train and /val)")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: --data-dir needs the ImageNet layout {split}/<class>/<image>")
    classes = [d for d in root.iterdir() if d.is_dir()]
    if not classes:
        raise ValueError(f"{root} has no class folders: expected {split}/<class>/<image>")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES for d in classes for f in d.iterdir()):
        raise ValueError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return root


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**31 - 1)


class SeededDataset(Dataset):
    """Applies `transform` with RNGs seeded from (seed, epoch, index): augmentation is a pure function of
    the sample, so a resumed run sees the same images whatever the worker count. Keys are (epoch, index)."""

    def __init__(self, dataset: Dataset, transform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        img, target = self.dataset[index]
        return self.transform(img), target


class EpochSampler(Sampler):
    """Shuffled (or ordered) indices for one epoch, sharded over ranks, optionally skipping a prefix.

    Yields (epoch, index) keys for `SeededDataset`; `skip` counts samples of this rank already consumed.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1,
                 pad: bool = True, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world, self.pad, self.skip = rank, world, pad, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            idx = list(epoch_permutation(self.n, self.seed, self.epoch))
        else:
            idx = list(range(self.n))
        if self.pad and self.world > 1:
            idx += idx[: (-len(idx)) % self.world]
        return idx[self.rank :: self.world][self.skip :]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._indices()])

    def __len__(self) -> int:
        return len(self._indices())


def posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """RandAugment's posterize for every bit count its magnitudes give, 0 included.

    The paper's policy (`rand-m9-mstd0.5-inc1`: PosterizeIncreasing with magnitude noise) reaches 0 bits
    on about 0.2 % of samples. Pillow up to 12 masked all bits then (a black image); Pillow 13 raises
    `ValueError: bits must be between or equal to 1 and 8`, which stopped training. This keeps the
    old result, so the policy is unchanged.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def guard_posterize(transform) -> int:
    """Give every posterize op inside `transform` (timm's RandAugment / AutoAugment) the 0-bit-safe
    function above; returns how many it changed. Only this transform's ops change, not timm's tables."""
    ops = list(getattr(transform, "transforms", []))
    changed = 0
    while ops:
        t = ops.pop()
        if isinstance(t, AugmentOp) and t.name.startswith("Posterize"):
            t.aug_fn = posterize_keeping_zero_bits
            changed += 1
        ops.extend(getattr(t, "ops", []) or [])
        ops.extend(getattr(t, "transforms", []) or [])
        for policy in getattr(t, "policy", []) or []:  # AutoAugment: a list of sub-policies
            ops.extend(policy)
    return changed


def build_transforms(data_cfg: dict, args) -> tuple:
    """timm's training (RandAugment, colour jitter, random erasing) and evaluation transforms."""
    train_tf = create_transform(
        data_cfg["input_size"], is_training=True, auto_augment=args.aa or None, color_jitter=args.color_jitter,
        re_prob=args.reprob, re_mode="pixel", interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
        std=data_cfg["std"], scale=(args.scale_min, 1.0), hflip=args.hflip)
    guard_posterize(train_tf)
    eval_tf = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
        std=data_cfg["std"], crop_pct=data_cfg["crop_pct"])
    return train_tf, eval_tf


def train_loader(dataset: SeededDataset, *, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                 workers: int, skip_batches: int = 0) -> DataLoader:
    """A loader over one epoch of `dataset`, starting after `skip_batches` batches (for exact resume)."""
    sampler = EpochSampler(len(dataset), seed=seed, epoch=epoch, shuffle=True, rank=rank, world=world,
                           skip=skip_batches * batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def eval_loader(root: Path, transform, *, batch_size: int, rank: int, world: int, workers: int,
                class_names: list[str] | None = None) -> DataLoader:
    """Evaluation loader over a class-folder split, sharded over ranks without padding. With the training
    run's `class_names`, labels are mapped by name, and a split whose classes differ is refused."""
    class_map = None
    if class_names is not None:
        found = {d.name for d in Path(root).iterdir() if d.is_dir()}
        missing, extra = sorted(set(class_names) - found), sorted(found - set(class_names))
        if missing or extra:
            raise ValueError(f"{root}: its classes are not the training classes (missing: {missing[:10]}, "
                             f"not trained on: {extra[:10]}); evaluate on a split with the same class folders")
        class_map = {name: i for i, name in enumerate(class_names)}
    ds = SeededDataset(ImageDataset(str(root), class_map=class_map), transform, seed=0)
    sampler = EpochSampler(len(ds), seed=0, epoch=0, shuffle=False, rank=rank, world=world, pad=False)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers)
