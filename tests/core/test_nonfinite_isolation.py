"""docs/spec.md section 5: a non-finite input stays inside its own sequence (and, causal, its own future).

One NaN in k (or v) of one sequence must leave every other batch entry and every other packed
document finite; in the causal ops, tokens before the NaN stay finite too where stated below.
"""

from __future__ import annotations

import pytest
import torch

from mhla_core import NoncausalConfig, causal_mixing_init, chunk_mhla, mhla

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _causal_inputs(B, T, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(B, T, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_causal_batch_entries_and_past_stay_finite(backend, where):
    B, T, C = 4, 128, 16
    q, k, v = _causal_inputs(B, T)
    t_bad = 37  # chunk 2, position 5
    (k if where == "k" else v)[1, t_bad, 0, 3] = float("nan")
    W = causal_mixing_init(T // C)
    o, _ = chunk_mhla(*(x.to(DEVICE) for x in (q, k, v)), W.to(DEVICE), chunk_size=C, backend=backend)
    o = o.cpu()
    assert torch.isfinite(o[[0, 2, 3]]).all(), "a NaN of sequence 1 reached other sequences"
    assert not torch.isfinite(o[1, t_bad:]).all()  # it does propagate inside its own sequence
    if backend == "torch" or where == "k":
        assert torch.isfinite(o[1, :t_bad]).all(), "a later token's NaN reached earlier outputs"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_packed_documents_stay_finite(backend):
    T, C = 160, 16
    q, k, v = _causal_inputs(1, T, seed=1)
    cu = [0, 40, 75, 160]
    k[0, 50, 1, 0] = float("nan")  # document 1
    W = causal_mixing_init(6)
    o, _ = chunk_mhla(*(x.to(DEVICE) for x in (q, k, v)), W.to(DEVICE), chunk_size=C,
                      cu_seqlens=torch.tensor(cu, device=DEVICE), backend=backend)
    o = o.cpu()[0]
    assert torch.isfinite(o[:40]).all() and torch.isfinite(o[75:]).all(), "a NaN crossed a document boundary"
    assert torch.isfinite(o[40:50]).all()
    assert not torch.isfinite(o[50:75]).all()


@pytest.mark.parametrize("path", ["parallel", "state", "torch"])
def test_noncausal_batch_entries_stay_finite(path):
    B, N, H, D, M = 3, 64, 2, 16, 4
    g = torch.Generator().manual_seed(2)
    q, k = (torch.rand(B, N, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, N, H, D, generator=g)
    k[1, 20, 0, 2] = float("nan")
    W = torch.rand(M, M, generator=g)
    backend = "torch" if path == "torch" else "triton"
    cfg = None if path == "torch" else NoncausalConfig(path=path)
    o = mhla(*(x.to(DEVICE) for x in (q, k, v)), W.to(DEVICE), block_size=N // M, backend=backend, config=cfg).cpu()
    assert torch.isfinite(o[[0, 2]]).all()
    assert not torch.isfinite(o[1]).all()
