"""chunk_mhla(backend="triton") against backend="torch" (docs/spec.md section 2); CPU tensors under TRITON_INTERPRET."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from mhla_core import causal_mixing_init, chunk_mhla  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from mhla_core.ops.causal import triton_ops  # noqa: E402
from tests.core.errors import rel_err  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(B, T, H, Dk, Dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, Dk, generator=g)
    k = torch.rand(B, T, H, Dk, generator=g)
    v = torch.randn(B, T, H, Dv, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def _mixing(L, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (L, L) if H is None else (H, L, L)
    return (causal_mixing_init(L) + torch.rand(*shape, generator=g)).to(DEVICE)


def _run(backend, q, k, v, W, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, W)]
    out, state = chunk_mhla(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad((out.float() * dout).sum(), leaves)
    return out, state, grads


def _compare(q, k, v, W, tol, **kw):
    dout = torch.randn(*v.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    o, st, g = _run("triton", q, k, v, W, dout, **kw)
    ro, rst, rg = _run("torch", q, k, v, W, dout, **kw)
    assert o.dtype == v.dtype and o.shape == v.shape
    assert rel_err(o, ro) < tol, "o"
    for name, a, b in zip("qkvW", g, rg):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel_err(a, b) < tol, name
    assert g[3].triu(1).abs().max() == 0
    return st, rst


def _same_state(a, b, tol):
    assert a.offsets == b.offsets and a.chunk_size == b.chunk_size
    assert a.chunk_states.dtype == torch.float32 and a.partial.dtype == torch.float32
    assert rel_err(a.chunk_states, b.chunk_states) < tol
    if b.partial.abs().max() > 0:
        assert rel_err(a.partial, b.partial) < tol
    else:
        assert a.partial.abs().max() == 0


@pytest.mark.parametrize("T,per_head,scale", [(64, False, None), (57, True, None), (9, False, 0.5)])
def test_forward_backward_fp32(T, per_head, scale):
    q, k, v = _inputs(2, T, 2, 16, 32, seed=T)
    W = _mixing(5, 2 if per_head else None, seed=T)
    _compare(q, k, v, W, TOL[torch.float32], chunk_size=16, scale=scale)


def test_odd_head_dims_and_chunk():
    q, k, v = _inputs(1, 50, 2, 12, 20, seed=1)
    W = _mixing(3, 2, seed=1)
    _compare(q, k, v, W, TOL[torch.float32], chunk_size=24)


@pytest.mark.parametrize("dtype,fast", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)])
def test_half_inputs(dtype, fast, monkeypatch):
    if fast:  # the faster, less exact settings the GPU sweep may pick
        monkeypatch.setattr(triton_ops, "STATE_HALF", True)
        monkeypatch.setattr(triton_ops, "MIX_PREC_HALF", "bf16")
        monkeypatch.setattr(triton_ops, "SAVE_STATES", True)
    q, k, v = _inputs(2, 45, 2, 16, 32, seed=5, dtype=dtype)
    W = _mixing(3, seed=5)
    _compare(q, k, v, W, TOL[dtype], chunk_size=16)


@pytest.mark.parametrize("save", [False, True])
def test_final_state_matches(save, monkeypatch):
    monkeypatch.setattr(triton_ops, "SAVE_STATES", save)
    q, k, v = _inputs(2, 43, 2, 16, 32, seed=11)
    W = _mixing(4, 2, seed=11)
    st, rst = _compare(q, k, v, W, TOL[torch.float32], chunk_size=16, output_final_state=True)
    _same_state(st, rst, TOL[torch.float32])


def test_cu_seqlens():
    lengths = [37, 9, 30]  # the middle document is shorter than a chunk
    T = sum(lengths)
    q, k, v = _inputs(1, T, 2, 16, 32, seed=21)
    W = _mixing(3, 2, seed=21)
    cu = torch.tensor([0, 37, 46, 76])
    st, rst = _compare(q, k, v, W, TOL[torch.float32], chunk_size=16, cu_seqlens=cu, output_final_state=True)
    _same_state(st, rst, TOL[torch.float32])
    # documents are independent: each equals its own unpacked run
    o, _ = chunk_mhla(q, k, v, W, chunk_size=16, cu_seqlens=cu, backend="triton")
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        single, _ = chunk_mhla(q[:, a:b], k[:, a:b], v[:, a:b], W, chunk_size=16, backend="triton")
        assert rel_err(o[:, a:b], single) < 1e-6


@pytest.mark.parametrize("prefix", [16, 21, 5])
def test_prefill_then_continue(prefix):
    T, C = 70, 16
    q, k, v = _inputs(2, T, 2, 16, 32, seed=prefix)
    W = _mixing(5, 2, seed=prefix)
    full, fst = chunk_mhla(q, k, v, W, chunk_size=C, output_final_state=True, backend="triton")
    head, state = chunk_mhla(q[:, :prefix], k[:, :prefix], v[:, :prefix], W, chunk_size=C,
                             output_final_state=True, backend="triton")
    tail, st2 = chunk_mhla(q[:, prefix:], k[:, prefix:], v[:, prefix:], W, chunk_size=C,
                           initial_state=state, output_final_state=True, backend="triton")
    assert rel_err(torch.cat([head, tail], 1), full) < TOL[torch.float32]
    _same_state(st2, fst, TOL[torch.float32])


@pytest.mark.parametrize("save", [False, True])
def test_initial_state_gradients_and_mixed_offsets(save, monkeypatch):
    """Different offsets per sequence, gradients through the initial state, against the torch backend."""
    monkeypatch.setattr(triton_ops, "SAVE_STATES", save)
    C = 16
    q, k, v = _inputs(2, 30, 2, 16, 32, seed=8)
    W = _mixing(5, 2, seed=8)
    _, s1 = chunk_mhla(q[:1, :19], k[:1, :19], v[:1, :19], W, chunk_size=C, output_final_state=True,
                       backend="torch")
    _, s2 = chunk_mhla(q[1:, :32], k[1:, :32], v[1:, :32], W, chunk_size=C, output_final_state=True,
                       backend="torch")
    state = triton_ops.MHLAState.cat([s1, s2])
    dout = torch.randn(2, 30, 2, 32).to(DEVICE)
    res = []
    for backend in ("triton", "torch"):
        cs = state.chunk_states.clone().requires_grad_()
        pa = state.partial.clone().requires_grad_()
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, W)]
        init = triton_ops.MHLAState(cs, pa, state.offsets, C)
        o, fin = chunk_mhla(*leaves, chunk_size=C, initial_state=init, output_final_state=True, backend=backend)
        loss = (o * dout).sum() + (fin.chunk_states ** 2).sum() * 1e-3 + fin.partial.sum()
        res.append((o, fin, torch.autograd.grad(loss, leaves + [cs, pa])))
    (o, fin, g), (ro, rfin, rg) = res
    assert rel_err(o, ro) < TOL[torch.float32]
    _same_state(fin, rfin, TOL[torch.float32])
    for name, a, b in zip(["q", "k", "v", "W", "chunk_states", "partial"], g, rg):
        assert rel_err(a, b) < TOL[torch.float32], name


def test_fp64_is_refused():
    q, k, v = _inputs(1, 8, 1, 16, 16, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        chunk_mhla(q, k, v, _mixing(1).double(), chunk_size=16, backend="triton")


def test_opcheck():
    q, k, v = _inputs(1, 20, 1, 16, 16, seed=2)
    W = _mixing(2, 1, seed=2).contiguous()
    table, _ = triton_ops._table(((0, 20, 0),), 16, q.device)
    for return_states, save_states in ((True, False), (False, True)):
        args = (q.clone().requires_grad_(), k, v, W, None, table, 16, 0.25, return_states, save_states, False, "ieee")
        torch.library.opcheck(torch.ops.mhla.chunk_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    empty = torch.empty(0)
    bargs = (torch.randn_like(v), empty, q, k, v, W, None, empty, empty, table, 16, 0.25, False, "ieee", True)
    torch.library.opcheck(torch.ops.mhla.chunk_bwd.default, bargs, test_utils=("test_schema", "test_faketensor"))


def test_many_tiles(monkeypatch):
    """Small blocks: several row blocks, tiles of Dk / Dv and split-K slices, across sequences."""
    small = {
        "state": {"BX": 16, "BY": 16, "num_warps": 4, "num_stages": 1},
        "fwd_o": {"BK": 16, "BV": 16, "num_warps": 4, "num_stages": 1},
        "mix": {"BM": 16, "BN": 64, "BR": 16, "num_warps": 4, "num_stages": 1},
        "mix_grad": {"BM": 16, "BN": 16, "BX": 64, "num_warps": 4, "num_stages": 1, "x_per_program": 256},
        "dqdk": {"BK": 16, "BV": 16, "num_warps": 4, "num_stages": 1},
        "dv": {"BK": 16, "BV": 16, "num_warps": 4, "num_stages": 1},
        "bwd_fused": {"fused": 0, "max_dk": 128, "BV": 16, "num_warps": 4, "num_stages": 1},
    }
    monkeypatch.setattr(triton_ops, "LAUNCH", small)
    q, k, v = _inputs(1, 80, 1, 24, 40, seed=4)
    W = _mixing(20, 1, seed=4)
    cu = torch.tensor([0, 3, 41, 80])
    st, rst = _compare(q, k, v, W, TOL[torch.float32], chunk_size=4, cu_seqlens=cu, output_final_state=True)
    _same_state(st, rst, TOL[torch.float32])


def test_torch_compile_fullgraph():
    q, k, v = _inputs(2, 40, 2, 16, 32, seed=9)
    W = _mixing(3, seed=9)

    def f(q, k, v, W):
        return chunk_mhla(q, k, v, W, chunk_size=16, backend="triton")[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, W)]
    ref = f(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    assert rel_err(out, ref) < 1e-6
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward(dtype, monkeypatch):
    """The one-program-per-chunk backward kernel (LAUNCH["bwd_fused"]) against the torch backend."""
    launch = {**triton_ops.LAUNCH, "bwd_fused": {**triton_ops.LAUNCH["bwd_fused"], "fused": 1, "BV": 16}}
    monkeypatch.setattr(triton_ops, "LAUNCH", launch)
    q, k, v = _inputs(1, 50, 2, 24, 40, seed=6, dtype=dtype)
    W = _mixing(4, 2, seed=6)
    cu = torch.tensor([0, 20, 50])
    _compare(q, k, v, W, TOL[dtype], chunk_size=16, cu_seqlens=cu)


def test_frozen_mixing():
    q, k, v = _inputs(2, 40, 2, 16, 32, seed=12)
    W = _mixing(3, seed=12)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, _ = chunk_mhla(*leaves, W, chunk_size=16, backend=backend)
        grads.append(torch.autograd.grad(o.square().sum(), leaves))
    for a, b in zip(*grads):
        assert rel_err(a, b) < TOL[torch.float32]
