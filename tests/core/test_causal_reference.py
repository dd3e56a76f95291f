"""chunk_mhla / fused_recurrent_mhla (backend="torch") against the float64 brute force (docs/spec.md section 2)."""

import pytest
import torch

from mhla_core import causal_mixing_init, chunk_mhla, fused_recurrent_mhla
from tests.core.brute import brute_causal
from tests.core.errors import rel_err


def _inputs(B, T, H, Dk, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, Dk, dtype=torch.float64, generator=g)
    k = torch.rand(B, T, H, Dk, dtype=torch.float64, generator=g)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=g)
    return q, k, v


def _mixing(L, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (L, L) if H is None else (H, L, L)
    return causal_mixing_init(L).double() + torch.rand(*shape, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("T,C,per_head,scale", [(24, 8, False, None), (29, 8, True, None), (13, 4, False, 0.7),
                                                (5, 8, False, None), (16, 16, True, 1.0)])
def test_chunk_matches_brute_force(T, C, per_head, scale):
    q, k, v = _inputs(2, T, 2, 3, 4, seed=T + C)
    W = _mixing(6, 2 if per_head else None, seed=T)
    out, state = chunk_mhla(q, k, v, W, chunk_size=C, scale=scale, backend="torch")
    assert state is None
    assert rel_err(out, brute_causal(q, k, v, W, C, scale)) < 1e-9


def test_upper_triangle_is_ignored():
    q, k, v = _inputs(1, 20, 2, 4, 4, seed=1)
    W = _mixing(4)
    noisy = W + torch.triu(torch.randn(4, 4, dtype=torch.float64), diagonal=1)
    a, _ = chunk_mhla(q, k, v, W, chunk_size=6, backend="torch")
    b, _ = chunk_mhla(q, k, v, noisy, chunk_size=6, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("per_head", [False, True])
def test_gradients_match_brute_force(per_head):
    q, k, v = _inputs(1, 11, 2, 3, 2, seed=7)
    W = _mixing(3, 2 if per_head else None, seed=2)
    leaves = [t.requires_grad_() for t in (q, k, v, W)]
    dout = torch.randn(1, 11, 2, 2, dtype=torch.float64)
    out, _ = chunk_mhla(*leaves, chunk_size=4, backend="torch")
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    ref = brute_causal(*leaves, 4)
    ref_grads = torch.autograd.grad((ref * dout).sum(), leaves)
    for name, g, r in zip("qkvW", grads, ref_grads):
        assert rel_err(g, r) < 1e-9, name
    assert grads[3].triu(1).abs().max() == 0


@pytest.mark.parametrize("prefix", [1, 7, 8, 13])
def test_prefill_then_decode_equals_one_pass(prefix):
    T, C = 22, 4
    q, k, v = _inputs(2, T, 2, 3, 5, seed=prefix)
    W = _mixing(6, 2, seed=prefix)
    full, _ = chunk_mhla(q, k, v, W, chunk_size=C, backend="torch")
    head, state = chunk_mhla(q[:, :prefix], k[:, :prefix], v[:, :prefix], W, chunk_size=C,
                             output_final_state=True, backend="torch")
    outs = [head]
    for t in range(prefix, T):  # one token at a time, each call passing the state back
        o, state = fused_recurrent_mhla(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], W, chunk_size=C,
                                        initial_state=state, output_final_state=True)
        outs.append(o)
    assert state.offsets == (T, T)
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-12


def test_recurrent_from_scratch_and_chunk_continuation():
    T, C = 19, 4
    q, k, v = _inputs(1, T, 1, 4, 4, seed=3)
    W = _mixing(5)
    full, full_state = chunk_mhla(q, k, v, W, chunk_size=C, output_final_state=True, backend="torch")
    rec, rec_state = fused_recurrent_mhla(q, k, v, W, chunk_size=C, output_final_state=True)
    assert rel_err(rec, full) < 1e-12
    assert rel_err(rec_state.chunk_states, full_state.chunk_states) < 1e-12
    assert rel_err(rec_state.partial, full_state.partial) < 1e-12
    a, st = chunk_mhla(q[:, :6], k[:, :6], v[:, :6], W, chunk_size=C, output_final_state=True, backend="torch")
    b, _ = chunk_mhla(q[:, 6:], k[:, 6:], v[:, 6:], W, chunk_size=C, initial_state=st, backend="torch")
    assert rel_err(torch.cat([a, b], 1), full) < 1e-12


def test_packed_sequences_equal_separate_runs():
    lengths, C = [9, 3, 14], 4
    q, k, v = _inputs(1, sum(lengths), 2, 3, 4, seed=11)
    W = _mixing(4, 2, seed=5)
    cu = torch.tensor([0, 9, 12, 26])
    packed, state = chunk_mhla(q, k, v, W, chunk_size=C, cu_seqlens=cu, output_final_state=True, backend="torch")
    for d, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref = brute_causal(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], W, C)
        assert rel_err(packed[:, lo:hi], ref) < 1e-9
        alone, alone_state = chunk_mhla(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], W, chunk_size=C,
                                        output_final_state=True, backend="torch")
        assert torch.allclose(state.partial[d], alone_state.partial[0], rtol=1e-12, atol=0)
        assert torch.allclose(state.chunk_states[d], alone_state.chunk_states[0])
    assert state.offsets == (9, 3, 14)
    # decode one more token for all three documents at once: offsets differ per sequence
    qn, kn, vn = _inputs(3, 1, 2, 3, 4, seed=12)
    step, _ = fused_recurrent_mhla(qn, kn, vn, W, chunk_size=C, initial_state=state)
    for d, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seq = [torch.cat([x[:, lo:hi], xn[d : d + 1]], 1) for x, xn in ((q, qn), (k, kn), (v, vn))]
        ref = brute_causal(*seq, W, C)
        assert rel_err(step[d : d + 1], ref[:, -1:]) < 1e-9


def test_multi_token_decode_with_offsets_that_cross_chunk_ends_at_different_steps():
    lengths, C, n_new = [9, 3, 14, 16], 4, 8  # the last row ends exactly at a chunk end, and reaches L * C
    q, k, v = _inputs(1, sum(lengths), 2, 3, 4, seed=21)
    W = _mixing(6, 2, seed=22)
    cu = torch.tensor([0, 9, 12, 26, 42])
    _, state = chunk_mhla(q, k, v, W, chunk_size=C, cu_seqlens=cu, output_final_state=True, backend="torch")
    new = _inputs(4, n_new, 2, 3, 4, seed=23)
    leaves = [x.clone().requires_grad_() for x in (*new, W)]
    out, final = fused_recurrent_mhla(*leaves, chunk_size=C, initial_state=state, output_final_state=True)
    assert final.offsets == tuple(n + n_new for n in lengths)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    ref_out, ref_grads = [], [torch.zeros_like(x) for x in leaves]
    for d, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        rows = [x[d : d + 1].clone().requires_grad_() for x in new] + [W.clone().requires_grad_()]
        seq = [torch.cat([x[:, lo:hi], xn], 1) for x, xn in zip((q, k, v), rows[:3])]
        ref = brute_causal(*seq, rows[3], C)[:, -n_new:]
        ref_out.append(ref)
        *g_qkv, g_w = torch.autograd.grad((ref * dout[d : d + 1]).sum(), rows)
        for acc, g in zip(ref_grads, g_qkv):
            acc[d : d + 1] += g
        ref_grads[3] += g_w
        _, alone = chunk_mhla(*seq, W, chunk_size=C, output_final_state=True, backend="torch")
        assert torch.allclose(final.chunk_states[d], alone.chunk_states[0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(final.partial[d], alone.partial[0], rtol=1e-12, atol=1e-12)
    assert rel_err(out, torch.cat(ref_out)) < 1e-9
    for name, g, r in zip("qkvW", grads, ref_grads):
        assert rel_err(g, r) < 1e-9, name


def test_half_inputs():
    q, k, v = _inputs(2, 40, 2, 16, 16, seed=9)
    W = _mixing(4)
    out, _ = chunk_mhla(q.bfloat16(), k.bfloat16(), v.bfloat16(), W.float(), chunk_size=16, backend="torch")
    ref, _ = chunk_mhla(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), W.float().double(),
                        chunk_size=16, backend="torch")
    assert out.dtype == torch.bfloat16
    assert rel_err(out.double(), ref) < 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_packed_document(backend):
    q, k, v = _inputs(1, 12, 2, 16, 16, seed=21)
    W = _mixing(3)
    if backend == "triton":  # CUDA where present, else the interpreter (tests/conftest.py)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v, W = (t.float().to(dev) for t in (q, k, v, W))
    cu = torch.tensor([0, 5, 5, 12], device=q.device)  # the middle document is empty
    out, state = chunk_mhla(q, k, v, W, chunk_size=4, cu_seqlens=cu, output_final_state=True, backend=backend)
    ref, _ = chunk_mhla(q, k, v, W, chunk_size=4, cu_seqlens=torch.tensor([0, 5, 12], device=q.device),
                        backend=backend)
    assert out.shape == q.shape[:3] + (16,) and state.offsets == (5, 0, 7)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert state.partial[1].abs().max() == 0 and state.chunk_states[1].abs().max() == 0
