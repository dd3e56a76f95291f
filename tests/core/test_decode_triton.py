"""fused_recurrent_mhla(backend="triton") against the chunk form; CPU tensors under TRITON_INTERPRET."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from mhla_core import MHLAState, causal_mixing_init, chunk_mhla, fused_recurrent_mhla  # noqa: E402
from mhla_core.ops.causal import StaticMHLAState, fused_recurrent_mhla_static, mix_chunk_states  # noqa: E402
from tests.core.errors import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(B, T, H, Dk, Dv, L, per_head, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(B, T, H, Dk, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g)
    shape = (H, L, L) if per_head else (L, L)
    W = (causal_mixing_init(L) + torch.rand(*shape, generator=g)).tril()
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [W.to(DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_after_prefill_equals_chunk_form(dtype, per_head):
    """Rows at different offsets (left-padded prefills), decoding across chunk boundaries."""
    C, L, H, Dk, Dv, steps = 8, 6, 2, 16, 24, 13
    q, k, v, W = _inputs(2, 20 + steps, H, Dk, Dv, L, per_head, seed=1, dtype=dtype)
    full, _ = chunk_mhla(q.float(), k.float(), v.float(), W, chunk_size=C, backend="torch")
    # row 0 prefills 20 tokens, row 1 prefills 15 (its first 5 are dropped: it starts later)
    pre = [chunk_mhla(q[i:i + 1, s:20], k[i:i + 1, s:20], v[i:i + 1, s:20], W, chunk_size=C,
                      output_final_state=True, backend="torch")[1] for i, s in ((0, 0), (1, 5))]
    state = MHLAState.cat(pre)
    assert state.offsets == (20, 15)
    sl = slice(20, 20 + steps)
    o_tri, st_tri = fused_recurrent_mhla(q[:, sl], k[:, sl], v[:, sl], W, chunk_size=C, initial_state=state,
                                         output_final_state=True, backend="triton")
    o_ref, st_ref = fused_recurrent_mhla(q[:, sl], k[:, sl], v[:, sl], W, chunk_size=C, initial_state=state,
                                         output_final_state=True, backend="torch")
    assert o_tri.dtype == dtype and o_tri.shape == o_ref.shape
    assert rel_err(o_tri, o_ref) < TOL[dtype]
    assert rel_err(o_tri[:1], full[:1, sl]) < TOL[dtype]  # row 0 equals the full forward
    assert st_tri.offsets == st_ref.offsets == (33, 28)
    assert rel_err(st_tri.chunk_states, st_ref.chunk_states) < 1e-5
    assert rel_err(st_tri.partial, st_ref.partial) < 1e-5
    assert st_tri.chunk_states.dtype == torch.float32


def test_decode_from_empty_state_and_input_state_untouched():
    C, L = 4, 5
    q, k, v, W = _inputs(3, 11, 2, 16, 16, L, False, seed=2, dtype=torch.float32)
    ref, ref_state = chunk_mhla(q, k, v, W, chunk_size=C, output_final_state=True, backend="torch")
    out, state = fused_recurrent_mhla(q, k, v, W, chunk_size=C, output_final_state=True, backend="triton")
    assert rel_err(out, ref) < 1e-5 and rel_err(state.chunk_states, ref_state.chunk_states) < 1e-5
    before = state.chunk_states.clone(), state.partial.clone()
    nxt = _inputs(3, 6, 2, 16, 16, L, False, seed=3, dtype=torch.float32)
    fused_recurrent_mhla(*nxt[:3], W, chunk_size=C, initial_state=state, backend="triton")  # crosses a chunk end
    assert torch.equal(state.chunk_states, before[0]) and torch.equal(state.partial, before[1])


def test_inputs_needing_grad_run_the_differentiable_path():
    q, k, v, W = _inputs(1, 5, 2, 16, 16, 3, False, seed=4, dtype=torch.float32)
    W.requires_grad_()
    out, _ = fused_recurrent_mhla(q, k, v, W, chunk_size=4, backend="triton")
    out.sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


@pytest.mark.parametrize("per_head", [False, True])
def test_one_token_per_call_keeps_the_mixed_state(per_head):
    """The state passed back carries S~ of the current chunk; rows cross chunk ends at different calls."""
    C, L, H, Dk, Dv, steps = 4, 8, 2, 16, 16, 11
    q, k, v, W = _inputs(2, 14 + steps, H, Dk, Dv, L, per_head, seed=5, dtype=torch.float32)
    full, _ = chunk_mhla(q, k, v, W, chunk_size=C, backend="torch")
    pre = [chunk_mhla(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], W, chunk_size=C, output_final_state=True,
                      backend="torch")[1] for i, n in ((0, 14), (1, 9))]
    state = MHLAState.cat(pre)
    outs = []
    for t in range(steps):
        cols = [14 + t, 9 + t]
        qt, kt, vt = (torch.stack([x[b, c] for b, c in enumerate(cols)])[:, None] for x in (q, k, v))
        o, state = fused_recurrent_mhla(qt, kt, vt, W, chunk_size=C, initial_state=state, output_final_state=True,
                                        backend="triton")
        outs.append(o)
        idx = torch.tensor([off // C for off in state.offsets], device=DEVICE)
        assert rel_err(state.mixed, mix_chunk_states(W, state.chunk_states, idx)) < 1e-5
    out = torch.cat(outs, dim=1)
    assert rel_err(out[0], full[0, 14:14 + steps]) < 1e-5 and rel_err(out[1], full[1, 9:9 + steps]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_static_triton_step_equals_the_pytorch_step(dtype, per_head):
    """In place, offsets on the device, a spare row and fewer chunk slots than L."""
    C, L, H, Dk, Dv, steps = 4, 8, 2, 16, 24, 10
    q, k, v, W = _inputs(2, 16 + steps, H, Dk, Dv, L, per_head, seed=6, dtype=dtype)
    pre = [chunk_mhla(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], W, chunk_size=C, output_final_state=True,
                      backend="torch")[1] for i, n in ((0, 16), (1, 7))]
    states = [StaticMHLAState.zeros(3, H, 7, Dk, Dv, C, device=DEVICE) for _ in range(2)]
    for s in states:
        s.load_(MHLAState.cat(pre), W)
    outs = {"triton": [], "torch": []}
    with torch.no_grad():
        for t in range(steps):
            cols = [16 + t, 7 + t]
            qt, kt, vt = (torch.stack([x[b, c] for b, c in enumerate(cols)])[:, None] for x in (q, k, v))
            for (name, lst), s in zip(outs.items(), states):
                lst.append(fused_recurrent_mhla_static(qt, kt, vt, W, s, backend=name))
    o_tri, o_ref = torch.cat(outs["triton"], 1), torch.cat(outs["torch"], 1)
    assert o_tri.dtype == dtype and rel_err(o_tri, o_ref) < TOL[dtype]
    full, _ = chunk_mhla(q[:1].float(), k[:1].float(), v[:1].float(), W, chunk_size=C, backend="torch")
    assert rel_err(o_tri[0].float(), full[0, 16:16 + steps]) < TOL[dtype]
    tri, ref = states
    assert tri.offsets.tolist() == ref.offsets.tolist() == [16 + steps, 7 + steps, 0]
    for name in ("chunk_states", "partial", "mixed"):
        assert rel_err(getattr(tri, name), getattr(ref, name)) < 1e-5, name
