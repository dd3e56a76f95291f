"""mhla_nlp.train on CPU: exact resume, boundary masking, baselines build, YAML configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mhla_nlp.train import build_model, build_parser, main, make_batch

from .helpers import make_packed

TINY = ["hidden_size=32", "num_hidden_layers=2", "num_heads=2", "vocab_size=40", "chunk_size=4", "max_chunks=4"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("lm"))


def _train(packed, out, *extra):
    return main(["--data", str(packed), "--output", str(out), "--model", "mhla", "--model-kwargs", *TINY,
                 "--batch-size", "2", "--grad-accum-steps", "2", "--max-steps", "4", "--warmup-steps", "1",
                 "--lr", "3e-3", "--log-interval", "1", "--eval-batches", "2", *extra])


def test_resume_is_exact(packed, tmp_path):
    straight = _train(packed, tmp_path / "a")
    _train(packed, tmp_path / "b", "--stop-at", "2")
    resumed = _train(packed, tmp_path / "b", "--resume")
    assert resumed["step"] == 4
    for (n, p), (_, q) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(p, q), n
    assert straight["val_loss"] == resumed["val_loss"]
    assert (tmp_path / "a" / "final" / "config.json").is_file()
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "tok_per_s" in lines[0]
    for layer in straight["model"].model.layers:  # the mixing constraint ran
        w = layer.attn.mixing_matrix
        assert float(w.min()) >= 0 and torch.all(w.triu(1) == 0)


def test_transformer_baseline_trains(packed, tmp_path):
    out = main(["--data", str(packed), "--output", str(tmp_path / "t"), "--model", "transformer", "--model-kwargs",
                "hidden_size=32", "num_hidden_layers=2", "num_attention_heads=2", "num_key_value_heads=2",
                "intermediate_size=64", "vocab_size=40", "--batch-size", "2", "--max-steps", "2",
                "--warmup-steps", "1", "--log-interval", "1", "--eval-batches", "1"])
    assert out["step"] == 2 and out["val_loss"] > 0


def test_make_batch_masks_boundaries():
    rows = [[1, 5, 6, 2, 1, 7, 8, 9], [10, 11, 2, 1, 12, 13, 14, 2]]
    cus = [[0, 4, 8], [0, 3, 8]]
    b = make_batch(rows, cus, "mhla", "cpu")
    assert b["input_ids"].shape == (1, 16)
    assert b["cu_seqlens"].tolist() == [0, 4, 8, 11, 16]
    assert (b["labels"][0] == -100).nonzero().flatten().tolist() == [0, 4, 8, 11]
    t = make_batch(rows, cus, "transformer", "cpu")
    assert t["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_configs_parse_and_gla_builds():
    from mhla_core.config import parse_with_config

    root = Path(__file__).resolve().parents[2] / "mhla_nlp" / "configs"
    for name in ("mhla_340M", "gla_340M", "transformer_340M"):
        args = parse_with_config(build_parser(), ["--config", str(root / f"{name}.yaml"), "--data", "x"])
        assert args.model == name.split("_")[0] and args.lr == 3e-4 and args.min_lr_ratio == 0.1
    gla = build_model("gla", dict(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=40))
    assert type(gla).__name__ == "GLAForCausalLM"


def test_linear_is_mhla_with_one_chunk():
    lin = build_model("linear", dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=40, chunk_size=4,
                                     max_chunks=4)).eval()
    w = lin.model.layers[0].attn.mixing_matrix
    assert not w.requires_grad and torch.equal(w, torch.ones(4, 4).tril())
    one = build_model("mhla", dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=40, chunk_size=16,
                                   max_chunks=1)).eval()
    sd = {k: v for k, v in lin.state_dict().items() if "mixing" not in k}
    one.load_state_dict(sd, strict=False)
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(lin(input_ids=x).logits, one(input_ids=x).logits, atol=1e-5, rtol=1e-5)
