"""scripts/bench_dit.py at tiny size on the CPU: rows for every attention, the markdown table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dit", ROOT / "scripts" / "bench_dit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_dit_tiny_cpu(tmp_path):
    bench = _bench()
    md = tmp_path / "bench.md"
    rows = bench.main(["--tiny", "--cpu", "--models", "DiT-S/2", "--resolutions", "64", "--attentions", "softmax",
                       "mhla", "--markdown", str(md)])
    assert [r["attention"] for r in rows] == ["softmax", "mhla"]
    assert all(r["train_img_s"] > 0 and r["sample_img_s"] > 0 and r["tokens"] == 16 for r in rows)
    table = md.read_text()
    assert "| DiT-S/2 | 64 | 16 | 2 | mhla |" in table and "torch " in table and "diffusers " in table


def test_bench_dit_tiny_cpu_compiled(tmp_path):
    """--compile: both attentions compiled the same way, the setting in the rows and the table's command."""
    md = tmp_path / "bench.md"
    rows = _bench().main(["--tiny", "--cpu", "--models", "DiT-S/2", "--resolutions", "64", "--attentions", "softmax",
                          "mhla", "--compile", "blocks", "--compile-backend", "aot_eager", "--rep-ms", "20",
                          "--markdown", str(md)])
    assert [r["compile"] for r in rows] == ["blocks", "blocks"] and all(r["train_img_s"] > 0 for r in rows)
    assert "--compile blocks" in md.read_text()
