"""DiT models: every registered size builds (tiny dims), shapes, CFG, single-block layouts, names, init."""

import math

import pytest
import torch

from mhla_core import MHLA, constrain_mixing
from mhla_dit.models import DiT_models, create_model, sincos_pos_embed_2d

from .conftest import TINY


def _inputs(b=2, c=4, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g), torch.randint(0, 1000, (b,), generator=g), torch.tensor([3, 7][:b])


def test_registry_has_all_sizes_and_patches():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert DiT_models["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert DiT_models["DiT-S/8"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)
    with pytest.raises(ValueError, match="DiT-S/2"):
        create_model("DiT-M/2")


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_every_size_builds_tiny_with_learned_sigma_shape(name):
    model = create_model(name, hidden_size=32, depth=1, num_heads=2, input_size=16, block_size=4)
    x, t, y = _inputs(s=16)
    out = model(x, t, y).sample
    assert out.shape == (2, 8, 16, 16)  # [B, 2C, H, W]
    side = 16 // DiT_models[name]["patch_size"]
    assert model.blocks[0].attn.num_blocks == max(1, side // 2) ** 2


@pytest.mark.parametrize("attention", ["mhla", "softmax", "linear"])
def test_attentions_forward_backward_and_cfg(attention):
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, attention=attention, **TINY)
    for p in model.final_layer.parameters():  # leave adaLN-Zero's zero output so outputs depend on the input
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = _inputs()
    out = model(x, t, y).sample
    out.square().mean().backward()
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    z = torch.cat([x[:1], x[:1]])
    yy = torch.tensor([5, model.num_classes])
    cfg = model.forward_with_cfg(z, t[:1].repeat(2), yy, 3.0)
    cond, uncond = model(x[:1], t[:1], yy[:1]).sample, model(x[:1], t[:1], yy[1:]).sample
    guided = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(cfg[0, :4], guided[0], atol=1e-5) and torch.allclose(cfg[1, :4], guided[0], atol=1e-5)
    assert torch.allclose(cfg[:1, 4:], cond[:, 4:], atol=1e-5)  # variance channels unguided
    assert torch.allclose(model.forward_with_cfg(z, t[:1].repeat(2), yy, 1.0)[:1], cond, atol=1e-5)


def test_attention_kinds_and_mhla_recipe():
    mhla = create_model("DiT-S/2", input_size=8, **TINY).blocks[0].attn
    assert isinstance(mhla, MHLA) and mhla.blocks == (2, 2) and mhla.normalizer == "reference"
    assert mhla.mixing_constraint == "clamp01" and mhla.qkv.bias is not None and mhla.lepe.kernel_size == (3, 3)
    assert mhla.proj_drop.p == 0.1 and isinstance(mhla.q_norm, torch.nn.Identity)
    assert mhla.norm.elementwise_affine
    lepe = mhla.lepe.weight  # identity at init: a centred delta
    assert torch.equal(lepe[:, 0, 1, 1], torch.ones(32)) and lepe.abs().sum() == 32
    linear = create_model("DiT-S/2", input_size=8, attention="linear", **TINY).blocks[0].attn
    assert linear.blocks == (1, 1) and torch.equal(linear.mixing, torch.ones(1, 1))
    soft = create_model("DiT-S/2", input_size=8, attention="softmax", **TINY).blocks[0].attn
    assert not isinstance(soft, MHLA)
    with pytest.raises(ValueError, match="attention"):
        create_model("DiT-S/2", attention="flash")


def test_single_block_layout_is_finite_and_equals_linear():
    # /8 at 256 px with 16-token blocks: a 4x4 grid is one block (the reference gives NaN here)
    kw = dict(hidden_size=32, depth=1, num_heads=2, input_size=32)
    torch.manual_seed(0)
    one = create_model("DiT-S/8", block_size=16, **kw)
    torch.manual_seed(0)
    lin = create_model("DiT-S/8", attention="linear", **kw)
    assert one.blocks[0].attn.blocks == (1, 1) and torch.equal(one.blocks[0].attn.mixing, torch.ones(1, 1))
    for m in (one, lin):
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.1)
        torch.nn.init.normal_(m.final_layer.adaLN_modulation[-1].weight, std=0.1)
    x, t, y = _inputs(s=32)
    lin.load_state_dict(one.state_dict())
    one.eval(), lin.eval()
    a, b = one(x, t, y).sample, lin(x, t, y).sample
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6)


def test_block_size_must_be_a_perfect_square():
    with pytest.raises(ValueError, match="perfect square"):
        create_model("DiT-S/2", input_size=8, hidden_size=32, depth=1, num_heads=2, block_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("DiT-S/4", input_size=10, hidden_size=32, depth=1, num_heads=2)


def test_paper_layout_s2_at_256px():
    model = create_model("DiT-S/2", depth=1)  # 32x32 latents, 16x16 tokens, 16 blocks of 4x4
    attn = model.blocks[0].attn
    assert model.grid == (16, 16) and attn.blocks == (4, 4) and attn.mixing.shape == (16, 16)
    assert attn.layout(model.grid).block_size == 16


def test_class_dropout_uses_null_class_in_training_only():
    model = create_model("DiT-S/2", input_size=8, class_dropout_prob=1.0, **TINY)
    table = model.y_embedder.embedding_table
    assert table.num_embeddings == 1001
    y = torch.tensor([1, 2])
    assert torch.equal(model.y_embedder(y, train=True), table.weight[[1000, 1000]])
    assert torch.equal(model.y_embedder(y, train=False), table.weight[[1, 2]])


def test_frozen_sincos_pos_embed():
    model = create_model("DiT-S/2", input_size=8, **TINY)
    assert not model.pos_embed.requires_grad
    emb = sincos_pos_embed_2d(8, 4)  # dim 8: omega = [1, 1e-2]; first half column, second half row
    row, col = 2, 3
    expect = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
              math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(emb[row * 4 + col], torch.tensor(expect), atol=1e-6)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 4))


def test_adaln_zero_init_and_mixing_clamp():
    model = create_model("DiT-S/2", input_size=8, **TINY)
    x, t, y = _inputs()
    assert model(x, t, y).sample.abs().max() == 0  # zero final layer
    assert all(b.adaLN_modulation[-1].weight.abs().max() == 0 for b in model.blocks)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.mixing.copy_(torch.tensor([[-1.0, 2.0, 0.5, 0.0]] * 4))
    constrain_mixing(model)
    assert attn.mixing.min() >= 0 and attn.mixing.max() <= 1 and attn.mixing[0, 2] == 0.5


def test_softmax_model_uses_facebookresearch_key_names():
    keys = set(create_model("DiT-S/2", input_size=8, attention="softmax", **TINY).state_dict())
    expect = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
              "final_layer.adaLN_modulation.1.bias"}
    expect |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expect |= {f"blocks.{b}.{m}.{p}" for b in range(2) for p in ("weight", "bias")
               for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}
    assert keys == expect


def test_triton_backend_matches_torch_reference_in_a_dit():
    """The MHLA kernels (interpreted on CPU) inside a DiT: outputs and every gradient match the PyTorch path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(hidden_size=48, depth=1, num_heads=2, input_size=8, block_size=4)  # head dim 24: not a power of 2
    torch.manual_seed(0)
    ref = create_model("DiT-S/2", backend="torch", **kw)
    for name, p in ref.named_parameters():  # leave adaLN-Zero so the attention reaches the output
        if "adaLN" in name or "final" in name:
            torch.nn.init.normal_(p, std=0.1)
    tri = create_model("DiT-S/2", backend="triton", **kw)
    tri.load_state_dict(ref.state_dict())
    ref, tri = ref.to(device).eval(), tri.to(device).eval()
    x, t, y = (a.to(device) for a in _inputs())
    a, b = ref(x, t, y, return_dict=False)[0], tri(x, t, y, return_dict=False)[0]
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert ref.blocks[0].attn.mixing.grad.abs().max() > 0
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4), name
