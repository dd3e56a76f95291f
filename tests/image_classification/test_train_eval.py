"""The training and evaluation scripts on a tiny real PNG folder (no downloads)."""

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mhla_core import MHLA
from mhla_image_classification import eval as eval_script
from mhla_image_classification.data import SeededDataset, eval_loader
from mhla_image_classification.evaluate import evaluate
from mhla_image_classification.train import main as train

TINY = ["embed_dim=32", "depth=2", "num_heads=2", "patch_size=4", "piece_size=2"]


def _flags(folder, out, steps, extra=()):
    return ["--model", "mhla_deit_tiny_patch16_224", "--model-kwargs", *TINY, "--data-dir", str(folder),
            "--output", str(out), "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--max-steps", str(steps), "--workers", "0", "--sched-on-updates", "--log-interval", "1",
            "--device", "cpu", *extra]


def _mixing(model):
    return torch.stack([m.mixing.detach() for m in model.modules() if isinstance(m, MHLA)])


def test_trains_three_steps_and_keeps_mixing_in_range(image_folder, tmp_path):
    loud = ["--lr", "0.2", "--warmup-epochs", "0", "--mixup", "0.2", "--cutmix", "1.0", "--model-ema"]
    metrics = train(_flags(image_folder, tmp_path / "a", 3, loud))
    assert metrics["step"] == 3 and math.isfinite(metrics["loss"])
    W = _mixing(metrics["model"])
    assert W.min() >= 0 and W.max() <= 1
    free = train(_flags(image_folder, tmp_path / "b", 3, [*loud, "--model-kwargs", *TINY, "mixing_constraint=none"]))
    assert _mixing(free["model"]).min() < 0  # the same steps without the constraint leave [0, 1]
    for name in ("last/model.safetensors", "last/ema.safetensors", "last/state.pt", "config.yaml", "log.jsonl"):
        assert (tmp_path / "a" / name).is_file(), name
    assert 0 <= metrics["top1"] <= 100 and metrics["count"] == 12


def test_resume_is_exact(image_folder, tmp_path):
    extra = ["--mixup", "0.2", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
             "--drop-path", "0.1", "--model-ema", "--eval-every", "0"]
    train(_flags(image_folder, tmp_path / "straight", 4, extra))
    train(_flags(image_folder, tmp_path / "split", 2, extra))
    train(_flags(image_folder, tmp_path / "split", 4, [*extra, "--resume"]))
    for name in ("last/model.safetensors", "last/ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert torch.load(tmp_path / "split" / "last" / "state.pt", weights_only=False)["step"] == 4


class KnownLogits(nn.Module):
    """Logits are the mean of each colour channel of the image: known for every image."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_evaluate_matches_hand_computation(image_folder):
    tf = lambda img: torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1)  # noqa: E731
    loader = eval_loader(image_folder / "val", tf, batch_size=5, rank=0, world=1, workers=0)
    got = evaluate(KnownLogits(), loader, torch.device("cpu"))
    ds = SeededDataset(loader.dataset.dataset, tf, 0)
    hits = [int(ds[(0, i)][0].mean(dim=(1, 2)).argmax() == ds[(0, i)][1]) for i in range(len(ds))]
    assert got["count"] == len(hits) == 12
    assert got["top1"] == pytest.approx(100 * sum(hits) / len(hits))
    assert got["top5"] == 100.0  # 3 classes: the top 3 always hold the label


def test_eval_script_on_checkpoint_and_throughput(image_folder, tmp_path):
    train(_flags(image_folder, tmp_path / "run", 2, ["--eval-every", "0"]))
    metrics = eval_script.main(["--checkpoint", str(tmp_path / "run" / "last" / "model.safetensors"), "--data-dir",
                                str(image_folder), "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert 0 <= metrics["top1"] <= 100 and metrics["count"] == 12
    rows = eval_script.main(["--throughput", "--models", "mhla_deit_tiny_patch16_224", "deit_tiny_patch16_224",
                             "--model-kwargs", "embed_dim=32", "depth=1", "num_heads=2", "--img-size", "64",
                             "--batch-size", "2", "--steps", "1", "--device", "cpu"])
    assert [r["model"] for r in rows] == ["mhla_deit_tiny_patch16_224", "deit_tiny_patch16_224"]
    assert all(r["img_per_s"] > 0 for r in rows)
    rows = eval_script.main(["--throughput", "--models", "mhla_deit_tiny_patch16_224", "--model-kwargs", "embed_dim=32",
                             "depth=1", "num_heads=2", "--img-size", "64", "--batch-size", "2", "--steps", "1",
                             "--device", "cpu", "--torchcompile", "aot_eager"])
    assert rows[0]["compile"] == "full" and rows[0]["img_per_s"] > 0
    compiled = eval_script.main(["--checkpoint", str(tmp_path / "run" / "last" / "model.safetensors"), "--data-dir",
                                 str(image_folder), "--batch-size", "4", "--workers", "0", "--device", "cpu",
                                 "--compile", "blocks", "--compile-backend", "aot_eager"])
    assert compiled["count"] == 12 and abs(compiled["top1"] - metrics["top1"]) < 1e-6


def test_clear_errors(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_flags(tmp_path / "nowhere", tmp_path / "x", 1))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        train(_flags(tmp_path / "empty", tmp_path / "x", 1))
    with pytest.raises(ValueError, match="unknown model 'mhla_deit_huge'"):
        train([*_flags(image_folder, tmp_path / "x", 1), "--model", "mhla_deit_huge"])
    with pytest.raises(ValueError, match="not divisible by piece_size=3"):
        train([*_flags(image_folder, tmp_path / "x", 1), "--model-kwargs", *TINY[:-1], "piece_size=3",
               "pad_tokens=False"])
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train([*_flags(image_folder, tmp_path / "fresh", 1), "--resume"])
