"""--init-from: standard (facebookresearch) DiT and authors' MHLA-DiT state dicts load with the right report."""

import argparse

import pytest
import torch

from mhla_dit.checkpoints import init_from, read_state_dict
from mhla_dit.models import create_model

DIM, DEPTH, P, SIDE, CLASSES = 32, 2, 2, 8, 1000  # tiny DiT-S/2: 4x4 tokens


def standard_dit_state(seed=0):
    """A state dict with facebookresearch DiT's key names and shapes (written out by hand)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "pos_embed": (1, (SIDE // P) ** 2, DIM),
        "x_embedder.proj.weight": (DIM, 4, P, P), "x_embedder.proj.bias": (DIM,),
        "t_embedder.mlp.0.weight": (DIM, 256), "t_embedder.mlp.0.bias": (DIM,),
        "t_embedder.mlp.2.weight": (DIM, DIM), "t_embedder.mlp.2.bias": (DIM,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, DIM),
        "final_layer.linear.weight": (P * P * 8, DIM), "final_layer.linear.bias": (P * P * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * DIM, DIM), "final_layer.adaLN_modulation.1.bias": (2 * DIM,),
    }
    for b in range(DEPTH):
        shapes |= {
            f"blocks.{b}.attn.qkv.weight": (3 * DIM, DIM), f"blocks.{b}.attn.qkv.bias": (3 * DIM,),
            f"blocks.{b}.attn.proj.weight": (DIM, DIM), f"blocks.{b}.attn.proj.bias": (DIM,),
            f"blocks.{b}.mlp.fc1.weight": (4 * DIM, DIM), f"blocks.{b}.mlp.fc1.bias": (4 * DIM,),
            f"blocks.{b}.mlp.fc2.weight": (DIM, 4 * DIM), f"blocks.{b}.mlp.fc2.bias": (DIM,),
            f"blocks.{b}.adaLN_modulation.1.weight": (6 * DIM, DIM), f"blocks.{b}.adaLN_modulation.1.bias": (6 * DIM,),
        }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _model(**kw):
    return create_model("DiT-S/2", hidden_size=DIM, depth=DEPTH, num_heads=2, input_size=SIDE, block_size=4, **kw)


MHLA_NEW = {f"blocks.{b}.attn.{n}" for b in range(DEPTH)
            for n in ("norm.weight", "norm.bias", "lepe.weight", "lepe.bias", "mixing")}


def test_standard_dit_checkpoint_into_mhla_reports_new_parameters(tmp_path):
    state = standard_dit_state()
    torch.save(state, tmp_path / "DiT-S-2.pt")  # facebookresearch checkpoints are plain state dicts
    model = _model()
    mixing = model.blocks[0].attn.mixing.detach().clone()
    report = init_from(model, tmp_path / "DiT-S-2.pt")
    assert set(report["missing"]) == MHLA_NEW and report["unexpected"] == [] and report["mismatched"] == []
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert torch.equal(model.blocks[0].attn.mixing, mixing)  # new MHLA parameters keep their init


def test_standard_dit_checkpoint_loads_fully_into_softmax():
    model = _model(attention="softmax")
    result = model.load_state_dict(standard_dit_state(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_authors_mhla_checkpoint_names_are_remapped(tmp_path):
    """The authors' MHLA-DiT names (to_qkv, to_out.0, piece_attn.conv [M, M, 1, 1]) inside {"model", "ema", "args"}."""
    state = standard_dit_state(seed=1)
    authors = {}
    for k, v in state.items():
        authors[k.replace("attn.qkv", "attn.to_qkv").replace("attn.proj", "attn.to_out.0")] = v
    for b in range(DEPTH):
        authors[f"blocks.{b}.attn.norm.weight"] = torch.full((DIM,), 2.0)
        authors[f"blocks.{b}.attn.norm.bias"] = torch.zeros(DIM)
        authors[f"blocks.{b}.attn.lepe.weight"] = torch.ones(DIM, 1, 3, 3)
        authors[f"blocks.{b}.attn.lepe.bias"] = torch.zeros(DIM)
        authors[f"blocks.{b}.attn.piece_attn.conv.weight"] = torch.full((4, 4, 1, 1), 0.25)
    ckpt = {"model": {f"module.{k}": v * 0 for k, v in authors.items()}, "ema": authors,
            "args": argparse.Namespace(model="DiT-S/2"), "epoch": 3}
    torch.save(ckpt, tmp_path / "epoch-0003.pt")
    assert read_state_dict(tmp_path / "epoch-0003.pt") is not None
    model = _model()
    report = init_from(model, tmp_path / "epoch-0003.pt")
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    attn = model.blocks[1].attn
    assert torch.equal(attn.mixing, torch.full((4, 4), 0.25)) and torch.equal(attn.norm.weight, torch.full((DIM,), 2.0))
    assert torch.equal(attn.qkv.weight, state["blocks.1.attn.qkv.weight"])  # the EMA weights were chosen


def test_shape_mismatches_are_skipped_and_reported(tmp_path):
    state = standard_dit_state()
    state["pos_embed"] = torch.zeros(1, 64, DIM)  # another resolution
    state["final_layer.unknown"] = torch.zeros(1)
    torch.save(state, tmp_path / "x.pt")
    report = init_from(_model(), tmp_path / "x.pt")
    assert report["mismatched"] == ["pos_embed"] and "pos_embed" in report["missing"]
    assert report["unexpected"] == ["final_layer.unknown"]
    with pytest.raises(FileNotFoundError):
        init_from(_model(), tmp_path / "missing.pt")


def test_train_init_from_prints_report(latent_store, tmp_path, capsys):
    from mhla_dit.train import main as train

    state = standard_dit_state()
    state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:3]  # 2 classes + null
    torch.save(state, tmp_path / "dit.pt")
    out = train(["--data-path", str(latent_store), "--model-kwargs", f"hidden_size={DIM}", f"depth={DEPTH}",
                 "num_heads=2", "block_size=4", "--global-batch-size", "4", "--max-steps", "1", "--workers", "0",
                 "--device", "cpu", "--output", str(tmp_path / "run"), "--init-from", str(tmp_path / "dit.pt")])
    printed = capsys.readouterr().out
    assert '"init_from"' in printed and "blocks.0.attn.mixing" in printed and '"unexpected": []' in printed
    assert out["step"] == 1


def test_our_checkpoint_format_loads_and_a_save_pretrained_folder_too(tmp_path):
    """A training checkpoint as the trainer has always written it (safetensors + model/model_kwargs/data
    metadata, data without a shift) rebuilds the model; so does a diffusers `save_pretrained` folder."""
    import json

    from safetensors.torch import save_file

    from mhla_dit.checkpoints import load_model

    kwargs = dict(hidden_size=DIM, depth=DEPTH, num_heads=2, input_size=SIDE, block_size=4)
    state = standard_dit_state(seed=3)
    for b in range(DEPTH):
        attn = f"blocks.{b}.attn"
        state |= {f"{attn}.norm.weight": torch.ones(DIM), f"{attn}.norm.bias": torch.zeros(DIM),
                  f"{attn}.lepe.weight": torch.randn(DIM, 1, 3, 3), f"{attn}.lepe.bias": torch.zeros(DIM),
                  f"{attn}.mixing": torch.rand(4, 4)}
    meta = {"model": "DiT-S/2", "model_kwargs": json.dumps(kwargs),
            "data": json.dumps({"vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215, "shape": [4, 8, 8]})}
    save_file(state, str(tmp_path / "ema.safetensors"), metadata=meta)
    model, read = load_model(tmp_path / "ema.safetensors")
    assert not model.training and read["data"]["scale"] == 0.18215 and "shift" not in read["data"]
    own = model.state_dict()
    assert own.keys() == state.keys() and all(torch.equal(own[k], v) for k, v in state.items())
    model.save_pretrained(tmp_path / "pretrained")
    again, none = load_model(tmp_path / "pretrained")
    assert none == {} and all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="save_pretrained"):
        load_model(tmp_path)
