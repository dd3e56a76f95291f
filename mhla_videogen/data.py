"""The latent store written by `mhla_videogen.extract` and the per-step sample order of the trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from mhla_core.training.seeding import sample_indices


class VideoLatentDataset:
    """The `{index}.safetensors` files of an extract folder: (latents [C, f, h, w], text [L, D])."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"latent folder {self.root} does not exist (run python -m mhla_videogen.extract)")
        self.files = sorted(p for p in self.root.glob("*.safetensors") if p.stem.isdigit())
        if not self.files:
            raise FileNotFoundError(f"no samples in {self.root}")
        if not (self.root / "empty.safetensors").is_file():
            raise FileNotFoundError(f"{self.root}/empty.safetensors (the empty-prompt embedding) is missing")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        d = load_file(str(self.files[i]))
        return d["latents"], d["text"]

    def empty_text(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / "empty.safetensors"))["text"]




def pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """[L, D] -> [length, D], zero rows appended (WanPipeline's padding), truncated if longer."""
    text = text[:length]
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])])


def batch_indices(step: int, batch: int, rank: int, world: int, n: int, seed: int) -> list[int]:
    """Sample indices of (step, rank): the shared stream of per-epoch permutations seeded by (seed, epoch)."""
    return sample_indices((step * world + rank) * batch, batch, n, seed)
