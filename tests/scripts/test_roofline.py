"""scripts/roofline.py: the FLOP and byte counts of both paths, and the measured column from a bench_ops log."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.roofline import measured_gpu_ms, parallel, state, table  # noqa: E402


def test_counts():
    # parallel: 8 products of 2 N^2 D' (D' = 128 for 72) per (b, h); 12 token passes of bf16
    f, b = parallel(32, 16, 256, 72)
    assert f == 8 * 2 * 256 * 256 * 128 * 32 * 16
    assert b == 12 * 32 * 256 * 16 * 72 * 2
    # state: 16 N D^2 token FLOPs + 8 M^2 C mixing FLOPs; 14 state passes + 14 token passes
    f, b = state(1, 12, 31500, 128, 150, state_bytes=4)
    C = 128 * 128 + 128
    tokens = 14 * 31500 * 12 * 128 * 2
    assert f == (16 * 31500 * 128 * 128 + 8 * 150 * 150 * C) * 12
    assert b == 14 * 150 * C * 4 * 12 + tokens
    # bf16 X and forward X~: 4 forward passes and, without the exact normaliser, 3 backward ones halve
    assert state(1, 12, 31500, 128, 150)[1] == (4 * 2 + 10 * 4) * 150 * C * 12 + tokens
    assert state(1, 12, 31500, 128, 150, exact=False)[1] == (7 * 2 + 7 * 4) * 150 * C * 12 + tokens


def test_measured_column_from_the_h200_log():
    got = measured_gpu_ms(ROOT / "docs" / "results" / "bench_ops_2026-12-01.log")
    assert got["DeiT-T 224"] == 0.215 and got["Wan 480p"] == 2.041 and len(got) == 9
    text = table(790e12, 4.3e12, got, state_bytes=4)
    assert "| DeiT-T 224 | **parallel** (chosen) | 25.8 | 151 |" in text
    assert "| Wan 480p | **state** (chosen) |" in text and "| 2.041 | 2.9x |" in text
