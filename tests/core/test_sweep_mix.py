"""scripts/sweep_mix.py --tiny: every mixing variant it times equals a float64 W X (interpreter on CPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_mix.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny mode is the CPU interpreter check")
def test_sweep_mix_tiny_variants_are_exact():
    spec = importlib.util.spec_from_file_location("sweep_mix", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--tiny"])
    assert [r["variant"] for r in rows] == ["triton default", "triton I64 (row tiles, out of place)",
                                            "triton I128 (row tiles, out of place)"]
    assert all(r["err"] < 1e-6 for r in rows), rows
