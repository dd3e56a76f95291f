"""MHLAAttention._prepare_inputs: the four input modes (dense, padded, packed, cached) against per-document runs."""

from __future__ import annotations

import pytest
import torch
from fla.models.utils import Cache

from mhla_nlp.layers.mhla import MHLAAttention

D = 32
TOL = dict(atol=1e-5, rtol=1e-4)


def _layer(seed: int = 0) -> MHLAAttention:
    torch.manual_seed(seed)
    layer = MHLAAttention(hidden_size=D, num_heads=2, chunk_size=4, max_chunks=8, layer_idx=0).eval()
    with torch.no_grad():  # off the init, so that the mixing matters
        layer.mixing_matrix.mul_(torch.rand_like(layer.mixing_matrix) + 0.5)
        layer.constrain_mixing()
    return layer


def _alone(layer: MHLAAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer on one document [n, D] as a batch of one, no mask: [n, D]."""
    return layer(x[None])[0][0]


def _padded(docs: list[torch.Tensor], T: int, sides: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    x = torch.randn(len(docs), T, D)  # padding positions hold noise: they must not leak
    mask = torch.zeros(len(docs), T, dtype=torch.long)
    where = []
    for i, (d, side) in enumerate(zip(docs, sides)):
        sl = slice(0, len(d)) if side == "right" else slice(T - len(d), T)
        x[i, sl], mask[i, sl] = d, 1
        where.append(sl)
    return x, mask, where


def test_dense_rows_are_independent():
    layer = _layer()
    x = torch.randn(3, 13, D)
    inputs = layer._prepare_inputs(x, None, None, None)
    assert inputs.x is x and inputs.cu_seqlens is None and inputs.indices is None
    assert torch.equal(inputs.positions, torch.arange(13).expand(3, 13))
    with torch.no_grad():
        out = layer(x)[0]
        ones = layer(x, attention_mask=torch.ones(3, 13, dtype=torch.long))[0]  # no padding: the dense mode
        for i in range(3):
            torch.testing.assert_close(out[i], _alone(layer, x[i]), **TOL)
    torch.testing.assert_close(ones, out, rtol=0, atol=0)


def test_padded_equals_per_document():
    layer = _layer(1)
    lengths, T = (7, 19, 0, 24), 24
    docs = [torch.randn(n, D) for n in lengths]
    x, mask, where = _padded(docs, T, ["left", "right", "right", "left"])
    inputs = layer._prepare_inputs(x, mask, None, None)
    assert inputs.x.shape == (1, sum(lengths), D)
    assert inputs.cu_seqlens.tolist() == [0, 7, 26, 26, 50]  # the row of only padding: an empty document
    assert torch.equal(inputs.indices, mask.flatten().nonzero().squeeze(1))
    assert inputs.positions[0].tolist() == [p for n in lengths for p in range(n)]
    with torch.no_grad():
        out = layer(x, attention_mask=mask)[0]
        for i, (d, sl) in enumerate(zip(docs, where)):
            if len(d):
                torch.testing.assert_close(out[i, sl], _alone(layer, d), **TOL)
    assert bool((out[mask == 0] == 0).all())  # padding positions come back zero


def test_packed_equals_per_document():
    layer = _layer(2)
    lengths = (5, 17, 1, 9)
    docs = [torch.randn(n, D) for n in lengths]
    cu = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)
    packed = torch.cat(docs)[None]
    inputs = layer._prepare_inputs(packed, None, cu, None)
    assert inputs.x is packed and inputs.indices is None
    assert inputs.positions[0].tolist() == [p for n in lengths for p in range(n)]
    with torch.no_grad():
        out = layer(packed, cu_seqlens=cu)[0][0]
        for d, a in zip(docs, cu[:-1].tolist()):
            torch.testing.assert_close(out[a:a + len(d)], _alone(layer, d), **TOL)
        whole = layer(packed)[0][0]
    assert not torch.allclose(out[5:22], whole[5:22], atol=1e-3)  # the boundaries matter


@pytest.mark.parametrize("new", [1, 6])  # one decoding step (fused_recurrent_mhla), a chunk (chunk_mhla)
def test_cached_equals_per_document(new):
    """A left-padded prefill with a cache, then `new` tokens per row: equal to each row's whole sequence alone."""
    layer = _layer(3)
    lengths, T = (3, 10, 0), 10
    docs = [torch.randn(n, D) for n in lengths]
    x, mask, where = _padded(docs, T, ["left"] * 3)
    cache = Cache()
    with torch.no_grad():
        layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
        state = cache[0]["recurrent_state"]
        assert state.offsets == lengths
        nxt = torch.randn(3, new, D)
        inputs = layer._prepare_inputs(nxt, None, None, state)
        assert inputs.x is nxt and inputs.cu_seqlens is None and inputs.indices is None
        assert inputs.positions.tolist() == [[n + t for t in range(new)] for n in lengths]
        step = layer(nxt, past_key_values=cache, use_cache=True)[0]
        for i, d in enumerate(docs):
            full = _alone(layer, torch.cat([d, nxt[i]]))
            torch.testing.assert_close(step[i], full[len(d):], **TOL)
    assert cache[0]["recurrent_state"].offsets == tuple(n + new for n in lengths)


def test_mode_errors():
    layer = _layer()
    x = torch.randn(2, 8, D)
    gap = torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    with pytest.raises(ValueError, match="contiguous"):
        layer._prepare_inputs(x, gap, None, None)
    with pytest.raises(ValueError, match="not both"):
        layer._prepare_inputs(x, torch.tensor([[0] + [1] * 7] * 2), torch.tensor([0, 16]), None)
    with pytest.raises(ValueError, match="batch 1"):
        layer._prepare_inputs(x, None, torch.tensor([0, 8, 16]), None)
    with pytest.raises(ValueError, match="rise from 0"):
        layer._prepare_inputs(x[:1], None, torch.tensor([0, 5]), None)
    with pytest.raises(ValueError, match="max_chunks"):
        layer._prepare_inputs(torch.randn(1, 40, D), None, torch.tensor([0, 7, 40]), None)
