"""MQAR: the generator's structure (Zoology's _mqar) and the --tiny sweep on CPU."""

from __future__ import annotations

import json

import torch

from mhla_nlp.mqar import main, mqar_data


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


def test_tiny_sweep_writes_table_and_plot(tmp_path):
    rows = main(["--tiny", "--out", str(tmp_path), "--models", "mhla", "linear", "softmax", "gla"])
    gla = {"gla"} if torch.cuda.is_available() else set()
    assert {r["model"] for r in rows} == {"mhla", "linear", "softmax"} | gla
    mhla = next(r for r in rows if r["model"] == "mhla")
    assert mhla["chunk_size"] == 2 and 0 <= mhla["accuracy"] <= 1
    assert "| mhla | 16 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "mqar.svg").read_text().startswith("<svg")
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    json.loads((tmp_path / "best.json").read_text())
