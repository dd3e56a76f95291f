"""scripts/compile_check.py and scripts/host_cost.py run on a machine without a GPU (subprocesses: the test
session itself runs Triton in the interpreter, which both scripts refuse)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_compile_check_compiles_the_parallel_kernels_for_sm90():
    pytest.importorskip("triton")
    r = _run("scripts/compile_check.py", "--shape", "2", "2", "128", "32", "8", "--variants", "default", "--sass")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ": ok, shared" in ln]
    assert {ln.split()[1] for ln in lines} == {"_par_fwd_kernel", "_par_dq_kernel", "_par_dkdv_kernel"}
    assert all("HGMMA" in ln for ln in lines)


def test_compile_check_refuses_the_interpreter():
    r = subprocess.run([sys.executable, "scripts/compile_check.py", "--shape", "1", "1", "64", "16", "4"], cwd=ROOT,
                       env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr


def test_host_cost_times_both_calls():
    pytest.importorskip("triton")
    r = _run("scripts/host_cost.py", "--reps", "3")
    assert r.returncode == 0, r.stderr
    fwd, fb = (float(x.split()[-1]) for x in r.stdout.strip().split(":")[-1].split(","))
    assert 0 < fwd < fb
