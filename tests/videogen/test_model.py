"""MHLAWanTransformer3DModel: forward, gradients, checkpointing, config, save/load."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from mhla_videogen.attention import MHLAWanAttention
from mhla_videogen.model import MHLAWanTransformer3DModel, resolve_layers

from .conftest import BLOCKS, TINY_WAN, tiny_inputs


def make(layers="hybrid", gated=False, seed=0, **kw):
    torch.manual_seed(seed)
    return MHLAWanTransformer3DModel(**TINY_WAN, mhla_layers=layers, block_layout=BLOCKS, mhla_gated=gated, **kw)


def test_resolve_layers():
    assert resolve_layers("hybrid", 30) == [i for i in range(30) if i % 3] and len(resolve_layers("hybrid", 30)) == 20
    assert resolve_layers("full", 4) == [0, 1, 2, 3]
    assert resolve_layers([2, 0, 2], 3) == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([3], 3)
    with pytest.raises(ValueError, match="hybrid"):
        resolve_layers("half", 3)


@pytest.mark.parametrize("layers,expected", [("hybrid", [1, 2]), ("full", [0, 1, 2])])
def test_forward_shape_matches_wan(layers, expected):
    model = make(layers, gated=True)
    assert model.config.mhla_layers == expected
    for i, block in enumerate(model.blocks):
        assert isinstance(block.attn1, MHLAWanAttention) == (i in expected)
        assert not isinstance(block.attn2, MHLAWanAttention)
    x, t, e = tiny_inputs()
    wan = WanTransformer3DModel(**TINY_WAN)
    out = model(x, t, e).sample
    assert out.shape == wan(x, t, e).sample.shape == x.shape
    assert torch.isfinite(out).all()


def test_non_divisible_grid_runs_padded():
    # the 480x832 situation scaled down: token grid (3, 3, 5) against (2, 2, 3) blocks
    model = make("full")
    x, t, e = tiny_inputs(frames=3, height=6, width=10)
    assert model(x, t, e).sample.shape == x.shape


def test_gradients_reach_mhla_parameters_and_checkpointing_matches():
    x, t, e = tiny_inputs(batch=1)
    grads = []
    for ckpt in (False, True):
        model = make("hybrid", gated=True)
        if ckpt:
            model.enable_gradient_checkpointing()
        model(x, t, e).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in ("g.weight", "g.bias", "g_norm.weight", "block_attn.conv.weight"):
        g = grads[0][f"blocks.1.attn1.{name}"]
        assert g.abs().sum() > 0, name
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_mixing_inits():
    from mhla_core import BlockLayout, block_distance_mixing

    dist = make("hybrid", gated=True, mixing_init="distance")
    w = dist.blocks[1].attn1.block_attn.conv.weight
    assert w.shape == (12, 12, 1, 1)
    torch.testing.assert_close(w[:, :, 0, 0], block_distance_mixing(BlockLayout(BLOCKS, BLOCKS), "linear"))
    assert torch.all(dist.blocks[1].attn1.g_norm.weight == 1)
    ref = make("hybrid", gated=True, mixing_init="reference")
    a = ref.blocks[2].attn1
    for p in (a.block_attn.conv.weight, a.g_norm.weight, a.g.weight):
        assert torch.all(p == 1e-6)
    assert torch.all(a.g.bias == 0)
    with pytest.raises(ValueError, match="mixing_init"):
        make(mixing_init="zeros")


def test_save_load_round_trip_exact(tmp_path):
    model = make([0, 2], gated=True)
    with torch.no_grad():
        model.blocks[2].attn1.block_attn.conv.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = MHLAWanTransformer3DModel.from_pretrained(tmp_path)
    assert loaded.config.mhla_layers == [0, 2] and loaded.config.mhla_gated
    assert tuple(loaded.config.block_layout) == BLOCKS
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, t, e = tiny_inputs()
    assert torch.equal(model(x, t, e).sample, loaded(x, t, e).sample)
