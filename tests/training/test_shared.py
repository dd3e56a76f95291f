"""mhla_core.training on its own: loss scaling, accumulation, atomic checkpoints, config checks, folder ownership."""

import argparse
import json
import os

import pytest
import torch
import torch.nn as nn

from mhla_core.training import checkpoint as ckpt
from mhla_core.training import make_accelerator, seeding, train_step
from mhla_core.training.run_folder import claim_run_folder
from mhla_core.training.session import Run


def _run(tmp_path, **overrides) -> Run:
    args = argparse.Namespace(device="cpu", amp_dtype="none", log_wandb=False, compile=False, **overrides)
    return Run(args, tmp_path, make_accelerator(args), {})


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_fp16_loss_scaling_takes_a_step_and_skips_an_overflow(tmp_path):
    """CPU runs train in fp32 (as accelerate does), so the fp16 path is driven with a CPU GradScaler in place of
    the CUDA one: a finite step is taken and unscaled; an overflowing one is skipped and halves the scale."""
    from accelerate import Accelerator

    r = _run(tmp_path)
    r.finish()  # a fresh accelerator state, in fp16
    r.accelerator = acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    ref = _model()
    nn.functional.mse_loss(ref(x), y).backward()
    stats = train_step(r, model, opt, [(x, y)], lambda b: {"loss": nn.functional.mse_loss(model(b[0]).float(), b[1])},
                       clip_grad=1e9)
    assert torch.isfinite(stats["loss"]) and not opt.step_was_skipped
    assert float(stats["grad_norm"]) == pytest.approx(float(torch.cat([p.grad.flatten() for p in ref.parameters()])
                                                               .norm()), rel=1e-2)  # unscaled before clipping
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = [p.detach().clone() for p in model.parameters()]
    train_step(r, model, opt, [(x, y)], lambda b: {"loss": model(b[0]).float().sum() * 1e30}, clip_grad=1e9)
    assert opt.step_was_skipped and acc.scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters()))


def test_two_micro_batches_equal_one_double_batch(tmp_path):
    r = _run(tmp_path)
    x, y = torch.randn(8, 8), torch.randn(8, 1)
    results = []
    for parts in (1, 2):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        micro = list(zip(x.chunk(parts), y.chunk(parts)))
        train_step(r, model, opt, micro, lambda b, m=model: {"loss": nn.functional.mse_loss(m(b[0]), b[1])})
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], _model()[0].weight)


def _save(run, step, value=1.0, **kw):
    return ckpt.save_checkpoint(run, step, weights={"model": {"w": torch.full((2,), value)}}, state={"x": step},
                                config={"frozen": {"model_kwargs": {"chunk_size": 64}}}, **kw)


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(FloatingPointError, match="non-finite model"):
        _save(tmp_path, 2, float("nan"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert os.readlink(tmp_path / "last") == "checkpoints/step_00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_guard_refuses_a_save_after_a_non_finite_loss(tmp_path):
    r = _run(tmp_path)
    r.guard.observe(torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        r.write(5, {"model": {"w": torch.zeros(2)}}, {})
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoints_pruned_kept_and_temporaries_ignored(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".tmp-step_00000009-1").mkdir()
    _save(tmp_path, 2, keep=lambda s: s == 2)
    _save(tmp_path, 3, keep=lambda s: s == 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    loaded = ckpt.load_checkpoint(tmp_path / "last")
    assert loaded.step == 3 and loaded.state["x"] == 3 and torch.equal(loaded.weights("model")["w"], torch.ones(2))


def test_changed_config_is_named():
    saved = {"model": "DiT-S/2", "model_kwargs": {"chunk_size": 64, "normalizer": "exact"}, "opt": "adamw"}
    ckpt.check_same_config(saved, json.loads(json.dumps(saved)), "x")
    with pytest.raises(ValueError, match=r"--model-kwargs \(model_kwargs.normalizer\): 'exact' in the checkpoint, "
                                         r"'reference' now") as e:
        ckpt.check_same_config(saved, {**saved, "model_kwargs": {"chunk_size": 64, "normalizer": "reference"}}, "x")
    assert "chunk_size" not in str(e.value)


def test_run_folder_is_owned(tmp_path):
    out = tmp_path / "run"
    claim_run_folder(out, resume=False, overwrite=False).release()  # an empty or new folder is fine
    (out / "log.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite to replace it"):
        claim_run_folder(out, resume=False, overwrite=False)
    assert not (out / ".lock").exists()
    claim_run_folder(out, resume=False, overwrite=True).release()
    assert not (out / "log.jsonl").exists()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(FileExistsError, match="in use by another run"):  # a live process holds it
        claim_run_folder(out, resume=True, overwrite=False)
    (out / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename}))
    claim_run_folder(out, resume=True, overwrite=False).release()  # that process is gone: taken over


def test_step_seeds_differ_and_epochs_are_permutations():
    seeds = {seeding.step_seed(0, s, r, m) for s in range(4) for r in range(2) for m in range(2)}
    assert len(seeds) == 16
    assert sorted(seeding.epoch_permutation(10, 1, 0)) == list(range(10))
    assert seeding.epoch_permutation(10, 1, 0) != seeding.epoch_permutation(10, 1, 1)
    assert seeding.sample_indices(8, 4, 10, 1) == [*seeding.epoch_permutation(10, 1, 0)[8:],
                                                   *seeding.epoch_permutation(10, 1, 1)[:2]]
