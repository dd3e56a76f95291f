"""A checkpoint write killed at each of its stages: resume still equals an uninterrupted run exactly, for each of
the four trainers (a tiny run of 3 updates with a checkpoint after every update, killed during the 2nd)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mhla_core.training import checkpoint as ckpt

from .conftest import cls_flags, dit_flags, lm_flags, trainer_main, video_flags

STAGES = ("model", "ema", "state", "config", "rename", "link", "prune")


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` handler swallows it."""


@pytest.fixture(scope="module")
def setups(dit_store, images, lm_data, wan):
    return {"dit": lambda out, n, *x: dit_flags(dit_store, out, n, *x),
            "cls": lambda out, n, *x: cls_flags(images, out, n, *x),
            "lm": lambda out, n, *x: lm_flags(lm_data, out, n, *x),
            "video": lambda out, n, *x: video_flags(wan, out, n, "--no-grad-checkpointing", *x)}


def _weights(out):
    return {f.stem: load_file(str(f)) for f in sorted((out / "last").glob("*.safetensors"))}


@pytest.mark.parametrize("trainer", ["dit", "cls", "lm", "video"])
def test_kill_during_checkpoint_then_resume_is_exact(trainer, setups, tmp_path, monkeypatch):
    main, flags = trainer_main(trainer), setups[trainer]
    main(flags(tmp_path / "straight", 3, "--checkpoint-every", "1"))
    want = _weights(tmp_path / "straight")
    for stage in STAGES:
        if stage == "ema" and trainer == "lm":
            continue  # no EMA in the LM trainer: the stage never comes
        out = tmp_path / stage
        saves = []

        def fault(name, stage=stage, saves=saves):
            saves.append(name)
            if saves.count("model") == 2 and name == stage:
                raise Killed(stage)

        monkeypatch.setattr(ckpt, "_stage", fault)
        with pytest.raises(Killed):
            main(flags(out, 3, "--checkpoint-every", "1"))
        monkeypatch.setattr(ckpt, "_stage", lambda name: None)
        # what a real kill leaves besides: a half-written temporary folder
        partial = out / "checkpoints" / ".tmp-step_00000002-1"
        partial.mkdir(exist_ok=True)
        (partial / "model.safetensors").write_bytes(b"\0" * 7)
        expect = 2 if stage in ("link", "prune") else 1  # renamed into place: complete
        assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).step == expect, stage
        main(flags(out, 3, "--checkpoint-every", "1", "--resume"))
        got = _weights(out)
        assert got.keys() == want.keys()
        for name in want:
            for k in want[name]:
                assert torch.equal(got[name][k], want[name][k]), (trainer, stage, name, k)
        assert not partial.exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if not {"final", "val_loss", "top1"} & r.keys()]
        assert steps == [1, 2, 3], steps  # replayed steps are not logged twice
