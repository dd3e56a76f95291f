"""MQAR: the generator's structure (Zoology's _mqar), the labelled-positions loss and the --tiny sweep on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from mhla_nlp.layers.mhla import MHLAAttention
from mhla_nlp.mqar import best_rows, labelled_logits, labelled_loss, main, mqar_data
from mhla_nlp.mqar_model import MQARModel, ShortConvMixer, build_mqar_model, set_mhla_backend


def test_generator_structure():
    V, T, kv = 64, 32, 4
    x, y = mqar_data(V, 50, T, kv, seed=3)
    assert x.shape == y.shape == (50, T)
    assert torch.equal(x, mqar_data(V, 50, T, kv, seed=3)[0]) and not torch.equal(x, mqar_data(V, 50, T, kv, 4)[0])
    for xi, yi in zip(x, y):
        keys, vals = xi[0:2 * kv:2], xi[1:2 * kv:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((vals >= V // 2) & (vals < V)).all()
        assert len(set(keys.tolist())) == kv and len(set(vals.tolist())) == kv
        pos = (yi != -100).nonzero().flatten()
        assert len(pos) == kv and (pos >= 2 * kv).all() and ((pos - 2 * kv) % 2 == 0).all()
        kmap = dict(zip(keys.tolist(), vals.tolist()))
        assert sorted(xi[pos].tolist()) == sorted(kmap) and all(kmap[int(xi[p])] == int(yi[p]) for p in pos)


def test_power_law_gaps_favour_short_distances():
    _, y = mqar_data(1024, 400, 256, 4, seed=0)
    gaps = ((y != -100).nonzero()[:, 1] - 8) // 2
    assert float(gaps.float().median()) < 30  # uniform over 124 slots would give ~62


@pytest.mark.parametrize("name", ["mhla", "softmax"])
def test_labelled_logits_match_full_logits_loss_and_grad(name):
    V, T, kv = 64, 32, 2
    x, y = mqar_data(V, 6, T, kv, seed=1)
    torch.manual_seed(0)
    model = build_mqar_model(name, 16, T, V).float().train()
    params = [p for p in model.parameters() if p.requires_grad]

    full = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    g_full = torch.autograd.grad(full, params)
    logits, targets = labelled_logits(model, x, y)
    assert logits.shape == (6 * kv, V) and torch.equal(targets, y[y != -100])
    loss = labelled_loss(model, x, y)
    g_lab = torch.autograd.grad(loss, params)

    assert abs(loss.item() - full.item()) < 1e-6
    for a, b in zip(g_full, g_lab):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert any(a.abs().sum() > 0 for a in g_full)


def test_mhla_backend_set_on_every_layer():
    model = build_mqar_model("linear", 16, 32, 64, mhla_backend="triton")
    layers = [m for m in model.modules() if isinstance(m, MHLAAttention)]
    assert len(layers) == 1 and all(m.backend == "triton" for m in layers)
    assert set_mhla_backend(model, "torch") == 1 and all(m.backend == "torch" for m in layers)
    with pytest.raises(ValueError, match="backend"):
        set_mhla_backend(model, "cuda")


def test_max_steps_caps_the_run(tmp_path):
    rows = main(["--tiny", "--out", str(tmp_path), "--models", "mhla", "softmax", "--max-steps", "3",
                 "--mhla-backend", "torch"])
    assert [r["steps"] for r in rows] == [3, 3]  # --tiny alone gives 2 epochs x 2 batches = 4
    assert {r["model"]: r["backend"] for r in rows} == {"mhla": "torch", "softmax": "sdpa"}
    with pytest.raises(ValueError, match="max steps"):
        main(["--tiny", "--out", str(tmp_path), "--models", "softmax", "--max-steps", "0"])


def test_tiny_sweep_writes_table_and_plot(tmp_path):
    rows = main(["--tiny", "--out", str(tmp_path), "--models", "mhla", "linear", "softmax", "gla"])
    gla = {"gla"} if torch.cuda.is_available() else set()
    assert {r["model"] for r in rows} == {"mhla", "linear", "softmax"} | gla
    mhla = next(r for r in rows if r["model"] == "mhla")
    assert mhla["chunk_size"] == 2 and 0 <= mhla["accuracy"] <= 1
    assert mhla["steps"] == 4 and mhla["backend"] == "torch" and mhla["step_ms"] > 0
    assert "| mhla | 16 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "mqar.svg").read_text().startswith("<svg")
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2 * len(rows)  # 2 default lrs
    json.loads((tmp_path / "best.json").read_text())


def test_zoology_frame_conv_then_mixer_tied_head():
    model = build_mqar_model("mhla", 32, 64, 128)
    assert isinstance(model, MQARModel) and isinstance(model.mixers[0], ShortConvMixer)
    assert model.mixers[1].layer.chunk_size == 4 and model.mixers[1].layer.max_chunks == 16
    assert model.lm_head.weight is model.embed.weight
    assert not any(isinstance(m, nn.Sequential) for m in model.modules())  # no MLP blocks
    linear = build_mqar_model("linear", 32, 64, 128).mixers[1].layer.mixing_matrix
    assert not linear.requires_grad and torch.equal(linear, torch.ones(16, 16).tril())
    with pytest.raises(ValueError, match="unknown mixer"):
        build_mqar_model("mamba", 32, 64, 128)


def test_short_conv_is_causal():
    torch.manual_seed(0)
    conv = ShortConvMixer(8)
    x = torch.randn(2, 10, 8)
    y = conv(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 8)
    assert torch.equal(conv(x2)[:, :6], y[:, :6]) and not torch.allclose(conv(x2)[:, 6:], y[:, 6:])


@pytest.mark.parametrize("name", ["mhla", "softmax"])
def test_mixer_is_causal(name):
    torch.manual_seed(0)
    model = build_mqar_model(name, 16, 32, 64).eval()
    x = torch.randint(64, (2, 32))
    x2 = x.clone()
    x2[:, 20:] = torch.randint(64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x2)[:, :20], model(x)[:, :20], rtol=1e-5, atol=1e-5)


def test_mixing_constraint_only_on_learned_mixing():
    mhla, linear = build_mqar_model("mhla", 16, 32, 64), build_mqar_model("linear", 16, 32, 64)
    with torch.no_grad():
        mhla.mixers[1].layer.mixing_matrix.fill_(2.0)
    mhla.constrain_mixing()
    linear.constrain_mixing()
    w = mhla.mixers[1].layer.mixing_matrix
    assert float(w.detach().max()) == 1.0 and float(w.detach().triu(1).abs().sum()) == 0
    assert torch.equal(linear.mixers[1].layer.mixing_matrix, torch.ones(16, 16).tril())


def test_best_rows_picks_best_lr_per_setting():
    runs = [dict(model=m, d_model=16, seq_len=32, lr=lr, accuracy=a)
            for m, lr, a in [("softmax", 1e-3, 0.2), ("softmax", 1e-2, 0.9), ("mhla", 1e-3, 0.5), ("mhla", 1e-2, 0.1)]]
    best = best_rows(runs)
    assert [(r["model"], r["lr"]) for r in best] == [("mhla", 1e-3), ("softmax", 1e-2)]


def test_parallel_jobs_equal_serial(tmp_path):
    argv = ["--tiny", "--models", "mhla", "softmax", "--max-steps", "2", "--lrs", "1e-3", "3e-3"]
    serial = main(argv + ["--out", str(tmp_path / "a")])
    parallel = main(argv + ["--out", str(tmp_path / "b"), "--jobs", "2"])
    key = ("model", "lr", "steps", "loss", "accuracy")
    assert [[r[k] for k in key] for r in serial] == [[r[k] for k in key] for r in parallel]
    assert len((tmp_path / "b" / "results.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="jobs"):
        main(argv + ["--out", str(tmp_path / "c"), "--jobs", "0"])


def test_from_results_rebuilds_table(tmp_path):
    rows = main(["--tiny", "--out", str(tmp_path / "a"), "--models", "softmax", "--max-steps", "1"])
    again = main(["--out", str(tmp_path / "b"), "--from-results", str(tmp_path / "a" / "results.jsonl")])
    assert again == rows and (tmp_path / "b" / "table.md").read_text() == (tmp_path / "a" / "table.md").read_text()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no runs"):
        main(["--out", str(tmp_path / "c"), "--from-results", str(tmp_path / "empty.jsonl")])


def test_best_rows_ties_do_not_depend_on_finish_order():
    runs = [dict(model="mhla", d_model=16, seq_len=32, lr=lr, accuracy=0.0) for lr in (3e-3, 1e-3, 1e-2)]
    assert best_rows(runs)[0]["lr"] == best_rows(runs[::-1])[0]["lr"] == 1e-3
