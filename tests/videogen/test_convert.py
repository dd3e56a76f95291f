"""from_wan (softmax Wan -> MHLA) and the released-checkpoint loader (authors' original-Wan key names)."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from mhla_videogen.convert import ConversionError, convert_released, from_wan, main
from mhla_videogen.model import MHLAWanTransformer3DModel

from .conftest import BLOCKS, TINY_WAN, tiny_inputs

DIM = TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"]
M = 12  # prod(BLOCKS)

# original Wan name -> diffusers name, written out independently of the converter
TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
PER_BLOCK = {
    **{f"self_attn.{a}": f"attn1.to_{a}" for a in "qkv"}, "self_attn.o": "attn1.to_out.0",
    **{f"cross_attn.{a}": f"attn2.to_{a}" for a in "qkv"}, "cross_attn.o": "attn2.to_out.0",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
NORMS = {"self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
         "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k"}


def authors_state_dict(mhla_layers, gated, seed=0):
    """A synthetic checkpoint in the authors' layout, tiny dims; returns (state dict, original -> diffusers names)."""
    g = torch.Generator().manual_seed(seed)
    c, f, t, ffn = TINY_WAN["in_channels"], TINY_WAN["freq_dim"], TINY_WAN["text_dim"], TINY_WAN["ffn_dim"]
    shapes = {
        "patch_embedding": ((DIM, c, 1, 2, 2), True), "text_embedding.0": ((DIM, t), True),
        "text_embedding.2": ((DIM, DIM), True), "time_embedding.0": ((DIM, f), True),
        "time_embedding.2": ((DIM, DIM), True), "time_projection.1": ((6 * DIM, DIM), True),
        "head.head": ((4 * c, DIM), True),
    }
    names = {}
    for k, v in TOP_LEVEL.items():
        names[k] = v
    for i in range(TINY_WAN["num_layers"]):
        for k, v in PER_BLOCK.items():
            shape = {"ffn.0": (ffn, DIM), "ffn.2": (DIM, ffn), "norm3": (DIM,)}.get(k, (DIM, DIM))
            shapes[f"blocks.{i}.{k}"] = (shape, True)
            names[f"blocks.{i}.{k}"] = f"blocks.{i}.{v}"
        for k, v in NORMS.items():
            shapes[f"blocks.{i}.{k}"] = ((DIM,), False)
            names[f"blocks.{i}.{k}"] = f"blocks.{i}.{v}"
        if i in mhla_layers:
            shapes[f"blocks.{i}.self_attn.g_norm"] = ((DIM // 2,), False)
            names[f"blocks.{i}.self_attn.g_norm"] = f"blocks.{i}.attn1.g_norm"
            shapes[f"blocks.{i}.self_attn.block_attn.conv"] = ((M, M, 1, 1), False)
            names[f"blocks.{i}.self_attn.block_attn.conv"] = f"blocks.{i}.attn1.block_attn.conv"
            if gated:
                shapes[f"blocks.{i}.self_attn.g"] = ((DIM, DIM), True)
                names[f"blocks.{i}.self_attn.g"] = f"blocks.{i}.attn1.g"
    sd, mapping = {}, {}
    for k, (shape, bias) in shapes.items():
        sd[f"{k}.weight"] = torch.randn(shape, generator=g)
        mapping[f"{k}.weight"] = f"{names[k]}.weight"
        if bias:
            sd[f"{k}.bias"] = torch.randn(shape[0], generator=g)
            mapping[f"{k}.bias"] = f"{names[k]}.bias"
    for i in range(TINY_WAN["num_layers"]):
        sd[f"blocks.{i}.modulation"] = torch.randn(1, 6, DIM, generator=g)
        mapping[f"blocks.{i}.modulation"] = f"blocks.{i}.scale_shift_table"
    sd["head.modulation"] = torch.randn(1, 2, DIM, generator=g)
    mapping["head.modulation"] = "scale_shift_table"
    return sd, mapping


# ---------------------------------------------------------------- from_wan

def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN)


@pytest.mark.parametrize("gated", [False, True])
def test_from_wan_reuses_every_weight(gated):
    wan = tiny_wan()
    model = from_wan(wan, layers="hybrid", gated=gated, block_layout=BLOCKS)
    sd, wsd = model.state_dict(), wan.state_dict()
    new = set(sd) - set(wsd)
    assert new == model.mhla_state_keys()
    assert {k.split(".attn1.")[1] for k in new} == (
        {"g.weight", "g.bias", "g_norm.weight", "block_attn.conv.weight"} if gated
        else {"g_norm.weight", "block_attn.conv.weight"})
    assert set(wsd) <= set(sd)
    assert all(torch.equal(sd[k], wsd[k]) for k in wsd)
    # the softmax layer 0 is untouched: same output for the same input
    x, t, e = tiny_inputs()
    hs, rot = torch.randn(2, 4 * 4 * 6, DIM), wan.rope(x)
    temb = torch.randn(2, 6, DIM)
    ctx = torch.randn(2, 5, DIM)
    torch.testing.assert_close(model.blocks[0](hs, ctx, temb, model.rope(x)), wan.blocks[0](hs, ctx, temb, rot),
                               rtol=0, atol=0)


def test_from_wan_without_mhla_layers_is_wan_and_from_path(tmp_path):
    wan = tiny_wan()
    x, t, e = tiny_inputs()
    same = from_wan(wan, layers=[], block_layout=BLOCKS)
    assert torch.equal(same(x, t, e).sample, wan(x, t, e).sample)
    wan.save_pretrained(tmp_path / "transformer")
    model = from_wan(tmp_path, layers="full", subfolder="transformer", block_layout=BLOCKS, mixing_init="reference")
    assert model.config.mhla_layers == [0, 1, 2]
    assert torch.all(model.blocks[0].attn1.block_attn.conv.weight == 1e-6)
    assert torch.equal(model.blocks[1].attn1.to_q.weight, wan.blocks[1].attn1.to_q.weight)


def test_from_wan_refuses_mismatch():
    wan = tiny_wan()
    wan.blocks[0].attn1.to_q = torch.nn.Linear(DIM, DIM + 2)
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn1\.to_q\.weight"):
        from_wan(wan, block_layout=BLOCKS)


# ---------------------------------------------------------------- released checkpoints

@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("layers,idx", [("hybrid", [1, 2]), ("full", [0, 1, 2])])
def test_convert_released_loads_exactly(layers, idx, gated):
    sd, mapping = authors_state_dict(idx, gated)
    model = convert_released(dict(sd), layers="auto", block_layout=BLOCKS)
    c = model.config
    assert c.mhla_layers == idx and c.mhla_gated == gated and tuple(c.block_layout) == BLOCKS
    assert c.num_attention_heads == 2 and c.attention_head_dim == 32 and c.ffn_dim == TINY_WAN["ffn_dim"]
    own = model.state_dict()
    assert set(own) == set(mapping.values())
    for orig, name in mapping.items():
        assert torch.equal(own[name], sd[orig]), (orig, name)
    assert convert_released(dict(sd), layers=layers, block_layout=BLOCKS).config.mhla_layers == idx
    x, t, e = tiny_inputs()
    assert torch.isfinite(model(x, t, e).sample).all()


def test_convert_refuses_partial_loads():
    sd, _ = authors_state_dict([1, 2], gated=True)
    extra = {**sd, "blocks.1.self_attn.lepe.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"unmatched checkpoint key.*blocks\.1\.attn1\.lepe\.weight"):
        convert_released(extra, block_layout=BLOCKS)
    missing = {k: v for k, v in sd.items() if k != "blocks.2.ffn.0.bias"}
    with pytest.raises(ConversionError, match=r"missing from the checkpoint: blocks\.2\.ffn\.net\.0\.proj\.bias"):
        convert_released(missing, block_layout=BLOCKS)
    wrong = {**sd, "blocks.0.cross_attn.o.weight": torch.zeros(DIM, DIM + 1)}
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn2\.to_out\.0\.weight: checkpoint \(64, 65\)"):
        convert_released(wrong, block_layout=BLOCKS)
    partial_gate = {k: v for k, v in sd.items() if not k.startswith("blocks.2.self_attn.g.")}
    with pytest.raises(ConversionError, match="gate keys only on some"):
        convert_released(partial_gate, block_layout=BLOCKS)
    with pytest.raises(ConversionError, match=r"MHLA on \[1, 2\]"):
        convert_released(dict(sd), layers="full", block_layout=BLOCKS)
    with pytest.raises(ConversionError, match="12x12, not the default layout"):
        convert_released(dict(sd))


def test_convert_cli(tmp_path, capsys):
    sd, mapping = authors_state_dict([1, 2], gated=True)
    save_file(sd, tmp_path / "model.safetensors")
    layout = ["--block-layout", "2", "2", "3"]
    args = ["--src", str(tmp_path / "model.safetensors"), "--dst", str(tmp_path / "out"), *layout]
    assert main(args) == 0
    assert "MHLA on 2" in capsys.readouterr().out
    model = MHLAWanTransformer3DModel.from_pretrained(tmp_path / "out")
    assert model.config.mhla_gated and model.config.mhla_layers == [1, 2]
    own = model.state_dict()
    assert all(torch.equal(own[name], sd[orig]) for orig, name in mapping.items())
    assert main(args[:4] + ["--layers", "full", "--overwrite", *layout]) == 1
    assert "error: --layers 'full' means layers [0, 1, 2]" in capsys.readouterr().err
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "model.pt")
    assert main(["--src", str(tmp_path / "model.pt"), "--dst", str(tmp_path / "out2"), *layout]) == 0


def test_convert_keeps_bf16_and_gating_from_keys():
    sd, mapping = authors_state_dict([1, 2], gated=False)
    sd = {k: v.bfloat16() for k, v in sd.items()}
    model = convert_released(dict(sd), block_layout=BLOCKS)
    assert not model.config.mhla_gated and model.blocks[1].attn1.g is None
    own = model.state_dict()
    assert all(own[name].dtype == torch.bfloat16 and torch.equal(own[name], sd[orig]) for orig, name in mapping.items())


def test_convert_cli_destinations_and_dtypes(tmp_path, capsys):
    """Issue 14 item 9: no silent no-op, no overwritten source, no silent cast."""
    sd, _ = authors_state_dict([1, 2], gated=True)
    src = tmp_path / "authors" / "model.safetensors"
    src.parent.mkdir()
    save_file(sd, src)
    layout = ["--block-layout", "2", "2", "3"]
    (tmp_path / "a_file").write_text("x")
    for dst, msg in ((tmp_path / "a_file", "is a file"), (src.parent, "is the folder of --src")):
        assert main(["--src", str(src), "--dst", str(dst), *layout]) == 1
        assert msg in capsys.readouterr().err
    assert src.is_file() and (tmp_path / "a_file").read_text() == "x"
    out = tmp_path / "out"
    assert main(["--src", str(src), "--dst", str(out), *layout]) == 0
    assert main(["--src", str(src), "--dst", str(out), *layout]) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["--src", str(src), "--dst", str(out), "--overwrite", *layout]) == 0
    mixed = {k: (v.half() if i % 2 else v) for i, (k, v) in enumerate(sd.items())}
    save_file(mixed, tmp_path / "mixed.safetensors")
    assert main(["--src", str(tmp_path / "mixed.safetensors"), "--dst", str(tmp_path / "m1"), *layout]) == 1
    assert "mixes float dtypes" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "mixed.safetensors"), "--dst", str(tmp_path / "m2"), "--dtype", "float32",
                 *layout]) == 0
    model = MHLAWanTransformer3DModel.from_pretrained(tmp_path / "m2")
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
