"""scripts/reproduce/lm_small.sh end to end at dry-run size on CPU: corpus, packing, three models, table."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lm_small_driver_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"), STEPS="2", SEEDS="0",
               SMALL="hidden_size=32 num_hidden_layers=1 vocab_size=8192", EVAL_BATCHES="1", EVAL_TOKENS="1024",
               CUDA_VISIBLE_DEVICES="")
    table = tmp_path / "table.md"
    res = subprocess.run(["bash", "scripts/reproduce/lm_small.sh", str(table)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["mhla", "linear", "softmax"]
    for r in rows:
        ppl = float(r.split("|")[3])
        assert 1.0 < ppl < 1e5  # a finite perplexity from a 2-step model over an 8192-token vocabulary
