"""The trainers' run folders: no silent overwrite, no non-finite checkpoint, no resume into another model, and
wandb left to its own settings (with the run id kept across --resume)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mhla_dit.train import main as dit

from .conftest import dit_flags


def test_rerun_without_resume_is_refused_and_overwrite_replaces(dit_store, tmp_path):
    out = tmp_path / "run"
    dit(dit_flags(dit_store, out, 2))
    before = load_file(str(out / "last" / "model.safetensors"))
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite to replace it"):
        dit(dit_flags(dit_store, out, 1))
    after = load_file(str(out / "last" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 2 was not replaced by step 1
    dit(dit_flags(dit_store, out, 1, "--overwrite"))
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]


def test_non_finite_loss_never_saved_over_the_last_good_checkpoint(dit_store, tmp_path, monkeypatch):
    from mhla_dit.diffusion import Diffusion

    calls, losses = [], Diffusion.training_losses

    def poisoned(self, *a, **k):
        calls.append(1)
        out = losses(self, *a, **k)
        return {n: v * float("nan") for n, v in out.items()} if len(calls) == 2 else out

    monkeypatch.setattr(Diffusion, "training_losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="non-finite loss before update 2"):  # logs every 100: the save
        dit(dit_flags(dit_store, out, 3, "--checkpoint-every", "1", "--log-interval", "100"))  # check catches it
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "last" / "model.safetensors")).values())


def test_resume_with_another_model_config_is_refused(dit_store, tmp_path):
    out = tmp_path / "run"
    dit(dit_flags(dit_store, out, 1))
    changed = dit_flags(dit_store, out, 2, "--resume")
    changed[changed.index("--model-kwargs") + 1: changed.index("--model-kwargs") + 1] = ["normalizer=reference"]
    with pytest.raises(ValueError, match=r"model_kwargs.normalizer\): None in the checkpoint, 'reference' now"):
        dit(changed)
    assert (out / "last").resolve().name == "step_00000001"


def test_wandb_follows_its_own_mode_and_resumes_the_run(dit_store, tmp_path, monkeypatch):
    import wandb

    seen, init = [], wandb.init

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    first = dit(dit_flags(dit_store, out, 1, "--log-wandb", "--wandb-project", "p"))
    dit(dit_flags(dit_store, out, 2, "--log-wandb", "--resume"))
    assert math.isfinite(first["loss"]) and len(seen) == 2
    assert not (out / "wandb").exists()  # disabled: nothing written
    assert "mode" not in seen[0] and seen[0]["resume"] == "allow" and seen[0]["id"] == seen[1]["id"]
    assert json.loads((out / "run.json").read_text())["id"] == seen[0]["id"]


def test_resume_path_forks_into_a_new_folder_but_never_rewinds_a_run(dit_store, tmp_path):
    a = tmp_path / "a"
    dit(dit_flags(dit_store, a, 2, "--checkpoint-every", "1", "--keep-every", "1"))
    first = a / "checkpoints" / "step_00000001"
    with pytest.raises(ValueError, match="holds a newer checkpoint \\(step_00000002\\)"):
        dit(dit_flags(dit_store, a, 2, "--resume", str(first)))
    dit(dit_flags(dit_store, tmp_path / "other", 1))
    with pytest.raises(FileExistsError, match="already holds a run"):  # another run's folder stays its own
        dit(dit_flags(dit_store, tmp_path / "other", 2, "--resume", str(first)))
    dit(dit_flags(dit_store, tmp_path / "fork", 2, "--resume", str(first)))
    want, got = load_file(str(a / "last" / "model.safetensors")), load_file(str(tmp_path / "fork" / "last" /
                                                                                "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_shared_flags_in_the_classification_trainer(images, tmp_path):
    """timm's --torchcompile (eager backend: no compiler needed), --grad-checkpointing, accumulation, and
    --initial-checkpoint (with lr 0 the weights stay the loaded ones)."""
    from mhla_image_classification.train import main as cls

    from .conftest import cls_flags

    out = cls(cls_flags(images, tmp_path / "a", 2, "--torchcompile", "eager", "--grad-checkpointing",
                        "--grad-accum-steps", "2", "--clip-grad", "1.0"))
    assert out["step"] == 2 and math.isfinite(out["loss"])
    start = tmp_path / "a" / "last" / "model.safetensors"
    again = cls(cls_flags(images, tmp_path / "b", 1, "--initial-checkpoint", str(start), "--lr", "0",
                          "--warmup-lr", "0", "--weight-decay", "0", "--mixup", "0", "--cutmix", "0"))
    loaded = load_file(str(start))
    assert all(torch.equal(v, loaded[k]) for k, v in again["model"].state_dict().items() if k in loaded)


def test_dit_grad_checkpointing_gives_the_same_updates(dit_store, tmp_path):
    plain = dit(dit_flags(dit_store, tmp_path / "plain", 2))["model"].state_dict()
    out = dit(dit_flags(dit_store, tmp_path / "ckpt", 2, "--grad-checkpointing"))
    ckpt, ema = out["model"], out["ema"]
    assert all(b.forward.__func__.__name__ == "_checkpointed_forward" for b in ckpt.blocks)  # they recompute
    assert all(b.forward.__self__ is b for b in ema.blocks)  # the EMA copy runs its own weights
    for k, v in ckpt.state_dict().items():
        torch.testing.assert_close(v, plain[k], rtol=1e-5, atol=1e-6, msg=k)


def _losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "step" in r]


def test_dit_compiled_gives_the_same_updates(dit_store, tmp_path):
    """--compile full (aot_eager: the traced graphs, op for op) trains the same weights; --compile blocks
    (inductor on the CPU; aot_eager trips over a non-contiguous gradient between blocks, a torch issue)
    logs the same losses. Weights are not compared there: inductor's fused reductions differ in the last
    bits, and Adam's first steps turn that into sign flips of near-zero gradients (adaLN starts at zero)."""
    plain_out = dit(dit_flags(dit_store, tmp_path / "plain", 2))
    plain = plain_out["model"].state_dict()
    full = dit(dit_flags(dit_store, tmp_path / "full", 2, "--compile", "--compile-backend", "aot_eager"))
    for k, v in full["model"].state_dict().items():
        torch.testing.assert_close(v, plain[k], rtol=1e-5, atol=1e-6, msg=k)
    blocks = dit(dit_flags(dit_store, tmp_path / "blocks", 2, "--compile", "blocks", "--compile-backend", "inductor"))
    assert all(b._compiled_call_impl is not None for b in blocks["model"].blocks)
    assert len(_losses(tmp_path / "blocks")) == 2
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "blocks")), torch.tensor(_losses(tmp_path / "plain")),
                               rtol=1e-4, atol=1e-5)
