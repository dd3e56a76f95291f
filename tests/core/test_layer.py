"""The MHLA layer: shapes, gradients, token order, mixing constraint, torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from mhla_core import MHLA
from tests.core.brute import brute_mhla


@pytest.mark.parametrize(
    "grid,kwargs",
    [
        ((16,), dict(blocks=4)),
        ((8, 8), dict(blocks=(2, 2), lepe_kernel=3, gate=True, qk_norm=True)),
        ((14, 14), dict(block_tokens=4, lepe_kernel=5, qkv_bias=True, normalizer="reference")),
        ((4, 6, 6), dict(blocks=(2, 3, 3), lepe_kernel=3, per_head_mixing=True, transform="exp")),
    ],
)
def test_shapes_and_every_parameter_gets_a_gradient(grid, kwargs):
    torch.manual_seed(0)
    layer = MHLA(32, 4, grid=grid, **kwargs)
    x = torch.randn(2, math.prod(grid), 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("grid,blocks", [((6, 4), (3, 2)), ((5, 7), (2, 3)), ((2, 4, 6), (2, 2, 3))])
def test_row_major_order_is_preserved(grid, blocks):
    """Each row-major token reads the blocks of its own grid tile (brute force on the layer's weights)."""
    torch.manual_seed(1)
    layer = MHLA(8, 2, blocks=blocks, normalizer="reference").double()
    with torch.no_grad():
        layer.mixing.add_(0.3 * torch.rand_like(layer.mixing))
    x = torch.randn(2, math.prod(grid), 8, dtype=torch.float64)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    heads = (2, x.shape[1], 2, 4)
    q = (F.relu(q) + 1e-6).reshape(heads)
    k = (F.relu(k) + 1e-6).reshape(heads)
    o = brute_mhla(q, k, v.reshape(heads), layer.mixing.detach(), grid, blocks, True, "reference", scale=1.0)
    ref = layer.proj(o.reshape(2, -1, 8))
    assert torch.allclose(layer(x, grid), ref, rtol=1e-9, atol=1e-12)
    perm = torch.randperm(x.shape[1])  # a shuffled input is a different image: the output must change
    assert not torch.allclose(layer(x[:, perm], grid), ref[:, perm], rtol=1e-6)


def test_mixing_constraint_and_frozen_mixing():
    layer = MHLA(16, 2, blocks=(2, 2), mixing_constraint="clamp01")
    with torch.no_grad():
        layer.mixing.copy_(torch.randn(4, 4) * 2)
    layer.constrain_mixing()
    assert layer.mixing.min() >= 0 and layer.mixing.max() <= 1
    frozen = MHLA(16, 2, blocks=(2, 2), mixing_trainable=False)
    assert "mixing" not in dict(frozen.named_parameters()) and "mixing" in dict(frozen.named_buffers())
    with pytest.raises(ValueError, match="mixing_constraint"):
        MHLA(16, 2, blocks=2, mixing_constraint="clamp")
    with pytest.raises(ValueError, match="exactly one"):
        MHLA(16, 2)


def test_torch_compile_on_cpu():
    torch.manual_seed(2)
    layer = MHLA(32, 4, grid=(8, 8), blocks=(2, 2), lepe_kernel=3, backend="torch")
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), rtol=1e-4, atol=1e-5)


def test_save_weights_with_tied_tensors(tmp_path):
    from mhla_core.checkpoint import load_weights, save_weights

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in a language model
    save_weights(model, tmp_path / "w.safetensors")
    other = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    load_weights(other, tmp_path / "w.safetensors")
    assert torch.equal(other[0].weight, model[0].weight) and torch.equal(other[1].weight, model[1].weight)
