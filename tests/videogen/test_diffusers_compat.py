"""The MHLA Wan transformer under diffusers' and accelerate's model tooling, as a diffusers user would call it.

Offloading hooks (group offload, accelerate's cpu_offload), layerwise casting, `from_pretrained` on a softmax
Wan folder, a `WanPipeline` save/load round trip and `fuse_qkv_projections`: tiny models, CPU, float32.
"""

import copy
import json
import pickle

import pytest
import torch
from diffusers import WanTransformer3DModel

from mhla_videogen.attention import MHLAWanAttention, RotaryWithGrid
from mhla_videogen.model import MHLAWanTransformer3DModel

from .conftest import BLOCKS, TINY_WAN, tiny_inputs


def make(layers="hybrid", gated=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = MHLAWanTransformer3DModel(**TINY_WAN, mhla_layers=layers, block_layout=BLOCKS, mhla_gated=gated, **kw)
    with torch.no_grad():  # non-trivial MHLA parameters, so that a lost or wrong one shows in the output
        for attn in model.mhla_attentions.values():
            attn.block_attn.conv.weight.uniform_(0.0, 1.0)
            attn.g_norm.weight.uniform_(0.5, 1.5)
    return model.eval()


@torch.no_grad()
def forward(model, seed=0):
    x, t, e = tiny_inputs(seed=seed)
    return model(x, t, e).sample


def test_rotary_with_grid_survives_moves_and_copies():
    from accelerate.utils import send_to_device

    rotary = RotaryWithGrid((torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 4)), (1, 2, 3))
    for moved in (send_to_device(rotary, "cpu"), rotary.to("cpu", non_blocking=True), rotary.to(torch.float64),
                  copy.deepcopy(rotary), copy.copy(rotary), pickle.loads(pickle.dumps(rotary))):
        assert isinstance(moved, RotaryWithGrid) and moved.grid == (1, 2, 3)
        assert all(torch.equal(a.double(), b.double()) for a, b in zip(moved, rotary))
    assert rotary.to(torch.float64)[0].dtype == torch.float64
    # a container that rebuilds it from its elements alone loses the grid; the processor then says so
    rebuilt = type(rotary)(t for t in rotary)
    assert rebuilt.grid is None and len(rebuilt) == 2


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_matches_plain(offload_type):
    ref = forward(make())
    model = make()
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), offload_type=offload_type, **kw)
    torch.testing.assert_close(forward(model), ref, rtol=0, atol=0)


def test_accelerate_cpu_offload_matches_plain():
    import accelerate

    ref = forward(make())
    model = make()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    torch.testing.assert_close(forward(model), ref, rtol=0, atol=0)


def test_layerwise_casting_float8_storage():
    """float8 storage, fp32 compute: equal to the fp32 model whose cast weights are rounded through float8.

    The matmuls run in the compute dtype (the hooks upcast each weight before its layer runs), so no float8
    matmul is needed on CPU. The mixing matrix is not cast (it is read as a matrix, not run as a conv).
    """
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    model = make()
    ref = make()
    model.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=torch.float32)
    stored = {n: p.dtype for n, p in model.named_parameters()}
    assert stored["blocks.1.attn1.to_q.weight"] == fp8 and stored["blocks.1.attn1.g.weight"] == fp8
    for name in ("block_attn.conv.weight", "g_norm.weight", "norm_q.weight"):
        assert stored[f"blocks.1.attn1.{name}"] == torch.float32, name
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if stored[n] == fp8:
                p.copy_(p.to(fp8).float())
    out = forward(model)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, forward(ref), rtol=1e-5, atol=1e-5)
    assert all(p.dtype == stored[n] for n, p in model.named_parameters())  # storage dtype restored after forward


@pytest.fixture
def wan_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "wan"
    WanTransformer3DModel(**TINY_WAN).save_pretrained(path)
    return path


@pytest.mark.parametrize("gated,mixing_init", [(False, "distance"), (True, "reference")])
def test_from_pretrained_softmax_dir_initialises_mhla(wan_dir, gated, mixing_init):
    from mhla_videogen.convert import from_wan

    model = MHLAWanTransformer3DModel.from_pretrained(
        wan_dir, mhla_layers="hybrid", block_layout=BLOCKS, mhla_gated=gated, mixing_init=mixing_init
    )
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert model.config.mhla_layers == [1, 2] and all(isinstance(model.blocks[i].attn1, MHLAWanAttention)
                                                      for i in (1, 2))
    expected = from_wan(wan_dir, layers="hybrid", gated=gated, mixing_init=mixing_init, block_layout=BLOCKS)
    sd, sd2 = model.state_dict(), expected.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd), [k for k in sd if not torch.equal(sd[k], sd2[k])]
    torch.testing.assert_close(forward(model), forward(expected.eval()), rtol=0, atol=0)


def test_from_pretrained_gated_distance_gate_is_initialised(wan_dir):
    """The gate's default init is random: check it is real (finite, not constant), not a copy of anything."""
    model, info = MHLAWanTransformer3DModel.from_pretrained(
        wan_dir, mhla_layers=[2], block_layout=BLOCKS, mhla_gated=True, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == sorted(model.mhla_state_keys())
    g = model.blocks[2].attn1.g
    assert g.weight.device.type == "cpu" and torch.isfinite(g.weight).all() and g.weight.std() > 0
    assert torch.isfinite(forward(model)).all()


def test_from_pretrained_mhla_dir_loads_exactly(tmp_path):
    model = make([0, 2])
    model.save_pretrained(tmp_path)
    loaded = MHLAWanTransformer3DModel.from_pretrained(tmp_path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_from_pretrained_refuses_half_a_gate(tmp_path):
    from safetensors.torch import load_file, save_file

    from mhla_videogen.convert import ConversionError

    make([1]).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["blocks.1.attn1.g.bias"]
    save_file(sd, weights)
    with pytest.raises(ConversionError, match="blocks.1.attn1.g.bias"):
        MHLAWanTransformer3DModel.from_pretrained(tmp_path)


def test_wan_pipeline_round_trip(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from .conftest import tiny_text_parts, tiny_vae

    tokenizer, text_encoder = tiny_text_parts(TINY_WAN["text_dim"])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(TINY_WAN["in_channels"]),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=make())
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["mhla_videogen.model", "MHLAWanTransformer3DModel"]
    loaded = WanPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is MHLAWanTransformer3DModel
    assert loaded.transformer.config.mhla_layers == [1, 2] and loaded.transformer.config.mhla_gated
    sd, sd2 = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    torch.testing.assert_close(forward(loaded.transformer), forward(pipe.transformer), rtol=0, atol=0)


def test_fuse_qkv_projections_matches_unfused():
    ref = forward(make())
    model = make()
    model.fuse_qkv_projections()
    assert all(b.attn1.fused_projections and hasattr(b.attn1, "to_qkv") for b in model.blocks)
    assert isinstance(model.blocks[1].attn1, MHLAWanAttention)
    torch.testing.assert_close(forward(model), ref, rtol=1e-5, atol=1e-6)
    model.unfuse_qkv_projections()
    assert not any(b.attn1.fused_projections or hasattr(b.attn1, "to_qkv") for b in model.blocks)
    torch.testing.assert_close(forward(model), ref, rtol=0, atol=0)
