"""scripts/bench_ops.py: the authors'-style loop baseline is exact, and --markdown keeps the rest of the file."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mhla_core import chunk_mhla
from tests.core.errors import rel_err

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("T", [64, 200])
def test_loop_baseline_equals_chunk_mhla(T):
    loop = _load("causal_loop_baseline").chunk_loop_mhla
    g = torch.Generator().manual_seed(T)
    B, H, Dk, Dv, C = 2, 3, 8, 12, 32
    q, k = (torch.rand(B, T, H, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    n = -(-T // C)
    W = torch.rand(n, n, generator=g, dtype=torch.float64).tril()
    ref = chunk_mhla(q, k, v, W, chunk_size=C, backend="torch")[0]
    out = loop(q, k, v, W, C)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-6  # the loop runs in fp32
    with pytest.raises(ValueError, match="mixing"):
        loop(q, k, v, W[:1, :1], C)


def test_markdown_section_replaced_in_place(tmp_path):
    bench = _load("bench_ops")
    doc = tmp_path / "bench.md"
    doc.write_text(f"# Title\n\nintro\n\n{bench.MARK_START}\nold table\n{bench.MARK_END}\n\n## Other\n\nkept\n")
    text = bench.main(["--device", "cpu", "--only", "causal", "--reps", "1", "--markdown", str(doc)])
    out = doc.read_text()
    assert out.startswith("# Title\n\nintro\n\n") and out.endswith("\n\n## Other\n\nkept\n")
    assert "old table" not in out and text in out and out.count(bench.MARK_START) == 1
    assert "authors'-style loop" in text and "MHLA reference (torch)" in text
    fresh = tmp_path / "new.md"
    bench.write_section(str(fresh), "table")
    assert fresh.read_text() == f"{bench.MARK_START}\ntable\n{bench.MARK_END}\n"


def test_markdown_keeps_subsections_not_remeasured(tmp_path):
    bench = _load("bench_ops")
    doc = tmp_path / "bench.md"
    doc.write_text(f"{bench.MARK_START}\nMeasured long ago.\n\n### Non-causal (old)\n\nold nc table\n\n"
                   f"### Causal (chunked)\n\nold causal table\n{bench.MARK_END}\n")
    bench.main(["--device", "cpu", "--only", "causal", "--reps", "1", "--markdown", str(doc)])
    out = doc.read_text()
    assert "old nc table" in out and "old causal table" not in out
    assert out.index("### Non-causal (old)") < out.index("### Causal (chunked)")
    assert out.count("### Causal (chunked)") == 1 and "authors'-style loop" in out
