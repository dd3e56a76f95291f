"""scripts/bench_lm.py: the CPU smoke run measures both models and writes its table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_lm", ROOT / "scripts" / "bench_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_lm_tiny(tmp_path):
    md = tmp_path / "bench.md"
    rows = _load().main(["--tiny", "--device", "cpu", "--models", "mhla", "transformer", "--markdown", str(md)])
    assert [r["model"] for r in rows] == ["mhla", "transformer"]
    for r in rows:
        assert r["train_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["params"] > 0
    text = md.read_text()
    assert "| MHLA |" in text and "| Transformer++ (Llama, SDPA, dynamic cache) | " in text and "1.00x" in text


def test_bench_lm_tiny_transformer_both_caches(tmp_path):
    """--tf-cache dynamic static: one Transformer++ row per cache, the faster decode is the 1.00x baseline."""
    md = tmp_path / "bench.md"
    rows = _load().main(["--tiny", "--device", "cpu", "--models", "transformer", "--tf-cache", "dynamic", "static",
                         "--markdown", str(md)])
    assert [r["cache"] for r in rows] == ["dynamic", "static"]
    assert all(r["decode_tok_s"] > 0 for r in rows)
    text = md.read_text()
    fast = max(rows, key=lambda r: r["decode_tok_s"])
    label = "static cache, compiled" if fast["cache"] == "static" else "dynamic cache"
    line = next(s for s in text.splitlines() if label in s)
    assert line.split("|")[7].strip() == "1.00x", line  # the decode ratio column of the faster row


def test_bench_lm_tiny_compiled_blocks(tmp_path):
    md = tmp_path / "bench.md"
    rows = _load().main(["--tiny", "--device", "cpu", "--models", "mhla", "transformer", "--compile", "blocks",
                         "--compile-backend", "aot_eager", "--markdown", str(md)])
    assert all(r["train_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert "(compile: blocks)" in md.read_text()
