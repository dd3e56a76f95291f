"""scripts/decode_ops.py: ops per cached decode step, and a guard on MHLA's host cost against Llama's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.decode_ops import main  # noqa: E402


def test_decode_ops_table_and_host_cost(tmp_path):
    md = tmp_path / "bench.md"
    md.write_text("# before\n\n<!-- decode_ops:start -->\nold\n<!-- decode_ops:end -->\n\n# after\n")
    args = ["--layers", "3", "--width", "16", "--batch", "2", "--prompt-len", "70", "--warmup", "0", "--reps", "2",
            "--markdown", str(md)]
    rows = {r["model"]: r for r in main(args)}
    assert set(rows) == {"mhla", "transformer"}
    assert all(r["ops"] > 0 and r["ms"] > 0 for r in rows.values())
    # the MHLA step (prefill crossed a chunk end: 70 tokens, chunks of 64) dispatched 2.0x Llama's ops per
    # layer before the decode path was reshaped for host cost, 1.45x after
    assert rows["mhla"]["ops_per_layer"] < 1.6 * rows["transformer"]["ops_per_layer"]
    text = md.read_text()
    assert text.startswith("# before") and text.rstrip().endswith("# after") and "old" not in text
    assert text.count("<!-- decode_ops:start -->") == 1 and "| MHLA |" in text
