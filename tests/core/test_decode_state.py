"""The decode state keeps the current chunk's mixed state (issue 16 item 1) and the preallocated static state
decodes in place without host syncs (item 2): float64 against one chunked pass (docs/spec.md section 2)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhla_core.ops.causal.recurrent as recurrent
from mhla_core import causal_mixing_init, chunk_mhla, fused_recurrent_mhla
from mhla_core.ops.causal import MHLAState, StaticMHLAState, fused_recurrent_mhla_static, mix_chunk_states
from tests.core.errors import rel_err

C, L, H, DK, DV = 4, 10, 2, 3, 5
PROMPTS, STEPS = (5, 12, 16), 20  # rows at different offsets; 20 steps cross 5 chunk ends per row, at different steps


def _inputs(B, T, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(B, T, H, DK, dtype=dtype, generator=g) for _ in range(2))
    return q, k, torch.randn(B, T, H, DV, dtype=dtype, generator=g)


def _mixing(per_head, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (H, L, L) if per_head else (L, L)
    return (causal_mixing_init(L).to(dtype) + torch.rand(*shape, dtype=dtype, generator=g)).tril()


def _case(per_head, dtype=torch.float64):
    """Per-row full sequences, the one-pass outputs at the decoded positions, and the prefill states."""
    q, k, v = _inputs(len(PROMPTS), max(PROMPTS) + STEPS, seed=7, dtype=dtype)
    W = _mixing(per_head, dtype=dtype)
    refs, states = [], []
    for b, n in enumerate(PROMPTS):
        seq = [x[b : b + 1, : n + STEPS] for x in (q, k, v)]
        full, _ = chunk_mhla(*seq, W, chunk_size=C, backend="torch")
        refs.append(full[:, n:])
        _, st = chunk_mhla(*(x[:, :n] for x in seq), W, chunk_size=C, output_final_state=True, backend="torch")
        states.append(st)
    new = [torch.stack([x[b, n : n + STEPS] for b, n in enumerate(PROMPTS)]) for x in (q, k, v)]
    return new, W, torch.cat(refs), MHLAState.cat(states)


def _expected_mixed(state, W):
    idx = torch.tensor([o // C for o in state.offsets])
    return mix_chunk_states(W, state.chunk_states, idx)


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_steps_from_prefills_of_different_lengths_equal_one_pass(per_head, monkeypatch):
    """One token per call, each call passing the state back; the mixed state is rebuilt only at chunk ends."""
    (q, k, v), W, ref, state = _case(per_head)
    assert state.mixed is None  # chunk_mhla leaves it to the first decode step
    rebuilds = []
    orig = recurrent._mixed_state
    monkeypatch.setattr(recurrent, "_mixed_state", lambda *a: rebuilds.append(1) or orig(*a))
    outs, offsets = [], list(PROMPTS)
    for t in range(STEPS):
        before = len(rebuilds)
        o, state = fused_recurrent_mhla(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], W, chunk_size=C,
                                        initial_state=state, output_final_state=True)
        outs.append(o)
        completes = any((off + 1) % C == 0 for off in offsets)
        assert len(rebuilds) - before == (t == 0) + completes, t  # first call: the prefill had no mixed state
        offsets = [off + 1 for off in offsets]
        assert torch.allclose(state.mixed, _expected_mixed(state, W), rtol=1e-13, atol=1e-13)
    assert state.offsets == tuple(n + STEPS for n in PROMPTS)
    assert rel_err(torch.cat(outs, dim=1), ref) < 1e-12


def test_multi_token_call_and_state_round_trip():
    """Several tokens in one call, then a chunked continuation from the decoded state (which ignores mixed)."""
    (q, k, v), W, ref, state = _case(per_head=True)
    a, st = fused_recurrent_mhla(q[:, :9], k[:, :9], v[:, :9], W, chunk_size=C, initial_state=state,
                                 output_final_state=True)
    b, st = fused_recurrent_mhla(q[:, 9:13], k[:, 9:13], v[:, 9:13], W, chunk_size=C, initial_state=st,
                                 output_final_state=True)
    c = torch.cat([chunk_mhla(q[i : i + 1, 13:], k[i : i + 1, 13:], v[i : i + 1, 13:], W, chunk_size=C,
                              initial_state=st.select(i), backend="torch")[0] for i in range(len(PROMPTS))])
    assert rel_err(torch.cat([a, b, c], dim=1), ref) < 1e-12


def test_mixed_state_is_rebuilt_when_the_mixing_needs_a_gradient():
    """With W requiring grad the op ignores the stored S~ and rebuilds it from the chunk states, so that dW
    reaches W[i, j] for every stored S_j: output and dW equal the chunked op's from the same state."""
    (q, k, v), W, _, state = _case(per_head=False)
    _, state = fused_recurrent_mhla(q[:, :3], k[:, :3], v[:, :3], W, chunk_size=C, initial_state=state,
                                    output_final_state=True)
    assert state.mixed is not None
    new = [x[:, 3:5] for x in (q, k, v)]
    Wg, Wr = W.clone().requires_grad_(), W.clone().requires_grad_()
    o, _ = fused_recurrent_mhla(*new, Wg, chunk_size=C, initial_state=state)
    r, _ = chunk_mhla(*new, Wr, chunk_size=C, initial_state=state, backend="torch")
    (gw,), (gr,) = torch.autograd.grad(o.sum(), [Wg]), torch.autograd.grad(r.sum(), [Wr])
    assert rel_err(o, r) < 1e-12 and rel_err(gw, gr) < 1e-12 and gw.tril(-1).abs().sum() > 0


@pytest.mark.parametrize("per_head", [False, True])
def test_static_state_decode_equals_one_pass(per_head):
    """Preallocated state with a spare row and fewer chunk slots than L, decoded in place (PyTorch step)."""
    (q, k, v), W, ref, state = _case(per_head)
    slots = -(-(max(PROMPTS) + STEPS) // C)  # 9 < L = 10
    static = StaticMHLAState.zeros(len(PROMPTS) + 1, H, slots, DK, DV, C, dtype=torch.float64)
    static.load_(state, W)
    buffers = [t.data_ptr() for t in (static.chunk_states, static.partial, static.mixed, static.offsets)]
    outs = []
    with torch.no_grad():
        for t in range(STEPS):
            outs.append(fused_recurrent_mhla_static(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], W, static,
                                                    backend="torch"))
    assert rel_err(torch.cat(outs, dim=1), ref) < 1e-12
    assert [t.data_ptr() for t in (static.chunk_states, static.partial, static.mixed, static.offsets)] == buffers
    assert static.offsets.tolist() == [n + STEPS for n in PROMPTS] + [0]
    assert static.max_offset == max(PROMPTS) + STEPS
    _, functional = fused_recurrent_mhla(q, k, v, W, chunk_size=C, initial_state=state, output_final_state=True)
    back = static.to_state(L, batch=len(PROMPTS))
    assert back.offsets == functional.offsets
    for name in ("chunk_states", "partial", "mixed"):
        assert rel_err(getattr(back, name), getattr(functional, name)) < 1e-12, name
    assert static.chunk_states[-1].abs().sum() == 0 and static.partial[-1].abs().sum() == 0  # the spare row


def test_static_state_from_empty_and_errors():
    q, k, v = _inputs(2, 2 * C + 1, seed=3)
    W = _mixing(False)
    ref, _ = chunk_mhla(q, k, v, W, chunk_size=C, backend="torch")
    static = StaticMHLAState.zeros(2, H, 3, DK, DV, C, dtype=torch.float64)
    assert static.empty
    with torch.no_grad():
        out = fused_recurrent_mhla_static(q, k, v, W, static, backend="torch")  # several tokens in one call
        assert rel_err(out, ref) < 1e-12 and not static.empty
        with pytest.raises(ValueError, match="max_cache_len >= 13"):  # 9 tokens + 4 > 3 slots * 4
            fused_recurrent_mhla_static(*(x[:, :4] for x in (q, k, v)), W, static, backend="torch")
        with pytest.raises(ValueError, match="1 <= B <= 2"):
            fused_recurrent_mhla_static(*(x.repeat(2, 1, 1, 1)[:, :1] for x in (q, k, v)), W, static)
    with pytest.raises(ValueError, match="inference only"):
        fused_recurrent_mhla_static(q[:, :1], k[:, :1], v[:, :1], W.clone().requires_grad_(), static)
    static.reset_()
    assert static.empty and static.max_offset == 0 and static.offsets.abs().sum() == 0
    long = MHLAState.zeros(1, H, L, DK, DV, C, dtype=torch.float64)
    long.offsets = (13,)
    with pytest.raises(ValueError, match="max_cache_len >= 13"):
        static.load_(long, W)


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host or builds a tensor from host data."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "equal", "is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.FORBIDDEN:
            raise AssertionError(f"host read or host-built tensor in the decode step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads(monkeypatch):
    """Also forbid the Tensor methods that read values without dispatching an op."""
    for name in ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"):
        def fail(*_, _name=name):
            raise AssertionError(f"Tensor.{_name} called in the decode step")
        monkeypatch.setattr(torch.Tensor, name, fail)
    with _NoHostReads():
        yield


def test_static_step_reads_no_value_on_the_host(no_host_reads):
    static = StaticMHLAState.zeros(2, H, 3, DK, DV, C)
    q, k, v = _inputs(2, 5, seed=4, dtype=torch.float32)
    with torch.no_grad():
        fused_recurrent_mhla_static(q, k, v, _mixing(True, dtype=torch.float32), static, backend="torch")


def test_static_step_traces_as_one_graph():
    """torch._dynamo with fullgraph=True: a host read or a branch on a tensor value would break the graph."""
    W = _mixing(True, dtype=torch.float32)
    q, k, v = _inputs(2, 2 * C, seed=5, dtype=torch.float32)
    eager = StaticMHLAState.zeros(2, H, 3, DK, DV, C)
    compiled = StaticMHLAState.zeros(2, H, 3, DK, DV, C)
    step = torch.compile(recurrent.naive_static_step_, fullgraph=True, backend="eager", dynamic=False)
    torch._dynamo.reset()
    with torch.no_grad():
        for t in range(2 * C):  # crosses a chunk end: both sides of every device-side select run
            ref = recurrent.naive_static_step_(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], W, eager, 0.5)
            out = step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], W, compiled, 0.5)
            torch.testing.assert_close(out, ref)
    torch.testing.assert_close(compiled.mixed, eager.mixed)
    assert compiled.offsets.tolist() == [2 * C, 2 * C]
