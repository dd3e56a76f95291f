"""scripts/bench_video.py --tiny --cpu writes a table with the three models."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_video.py"


def test_bench_tiny_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_video", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    md = tmp_path / "bench.md"
    rows = bench.main(["--tiny", "--cpu", "--markdown", str(md), "--extra-shapes", "5x64x112"])
    assert [r["model"] for r in rows] == ["softmax", "softmax", "hybrid", "hybrid", "full", "full"]
    assert [r["mhla_layers"] for r in rows] == [0, 0, 2, 2, 3, 3]
    assert [r["tokens"] for r in rows[:2]] == [48, 56]  # 2x4x6, 2x4x7 (padded by the block layout)
    assert rows[0]["speedup"] == 1.0 and all(r["forward_ms"] > 0 for r in rows)
    text = md.read_text()
    assert text.count("| - |") == 6  # no peak memory on CPU
    assert "| 5x64x96 | 48 | softmax | 0 |" in text and "| 5x64x112 | 56 | full | 3 |" in text and "torch " in text
    # the 1.3B config has the shape facts
    cfg = bench.WAN_1_3B
    dims = (cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"])
    assert dims == (1536, 8960, 30)


def test_bench_tiny_cpu_both_precisions(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_video", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--cpu", "--models", "softmax", "full", "--mhla-precision", "reference", "fast"])
    assert [r["model"] for r in rows] == ["softmax", "full", "full-fast"]
    assert rows[2]["speedup"] > 0 and rows[2]["mhla_layers"] == 3


def test_bench_tiny_cpu_compiled_blocks():
    """--compile blocks goes through diffusers' compile_repeated_blocks on both transformers."""
    spec = importlib.util.spec_from_file_location("bench_video", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--cpu", "--models", "softmax", "full", "--compile", "blocks", "--compile-backend",
                       "aot_eager", "--reps", "1", "--warmup", "1"])
    assert [r["model"] for r in rows] == ["softmax", "full"] and all(r["forward_ms"] > 0 for r in rows)
