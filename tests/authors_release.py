"""Helpers of the parity tests against the authors' release (DAGroup-PKU/MHLA, tests/*/test_authors_parity.py).

The release is read from MHLA_AUTHORS_REPO (a git clone or bare mirror), by default the local mirror; a test
that needs it skips when it is absent. Each test file keeps its own patches and lists them in its docstring;
these are the pieces they share: extracting files of the release, loading their modules under their own names,
running their `torch.compile` eagerly, reporting differences, and their attention with the corrected denominator.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from einops import rearrange

MIRROR = "/work/.mirror/DAGroup-PKU+MHLA/repo"
REPO = os.environ.get("MHLA_AUTHORS_REPO", MIRROR)


def extract(dest: Path, *paths: str) -> Path:
    """Unpack `paths` of the release's HEAD under `dest` and return `dest`; skip the test when the release is
    absent or cannot be read."""
    if not Path(REPO).exists():
        pytest.skip("the authors' release is not available (set MHLA_AUTHORS_REPO)")
    archive = subprocess.run(["git", "-C", REPO, "archive", "HEAD", *paths], capture_output=True, check=False)
    if archive.returncode:
        pytest.skip(f"cannot read the authors' release: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def eager_compile(fn: Callable | None = None, **kwargs) -> Callable:
    """Stands in for `torch.compile` while their files load: `@torch.compile` and `@torch.compile(...)` leave the
    function as it is (the same operations, run eagerly)."""
    return fn if fn is not None else (lambda f: f)


def package(name: str, path: Path | str | None = None, **attrs) -> types.ModuleType:
    """A package stub `name` (its `__init__` is not run) whose submodules are found under `path` (none without),
    holding `attrs`."""
    pkg = types.ModuleType(name)
    pkg.__dict__.update(attrs)
    pkg.__path__ = [str(path)] if path is not None else []
    return pkg


def load_module(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> types.ModuleType:
    """Run the file `path` as the module `name`, registered in `sys.modules` through `monkeypatch` (so that the
    registration is undone with it) before it runs, as their own imports expect."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """Print and return the max abs difference and the max relative one, as max |diff| / max |theirs| (the
    scale of the output); the elementwise max |diff| / |theirs| is printed too."""
    diff = (ours - theirs).abs()
    abs_, rel = diff.max().item(), (diff.max() / theirs.abs().max()).item()
    elem = (diff / theirs.abs().clamp_min(torch.finfo(theirs.dtype).tiny)).max().item()
    print(f"\n{name}: max abs diff {abs_:.3e}, max rel diff {rel:.3e} (elementwise {elem:.3e})")
    return abs_, rel


def corrected(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of their non-causal attention (`MHLA_Normed_Torch` of their classification code, `MHLA4DiT`
    of their DiT code) on [B, blocks, tokens per block, C] with the denominator of docs/spec.md section 1:
    q_t . (sum_j W[i, j] z_j)."""
    x = attn.norm(x)
    B, N, W, C = x.shape
    q, k, v, lepe = attn._mlp_lepe(x)
    q, k, v = attn._process_qkv_impl(q, k, v, B, N, attn.num_heads, attn.head_dim)
    kv = attn.piece_attn(torch.matmul(k, v))
    z = attn.piece_attn(k.sum(dim=-1, keepdim=True))  # mixed key sums z~_i [B*H, M, D, 1]
    out = torch.matmul(q, kv) / (torch.matmul(q, z) + attn.eps)
    out = rearrange(out, "(b h) n w d -> b n w (h d)", b=B, h=attn.num_heads) + lepe
    return attn.to_out(out)
