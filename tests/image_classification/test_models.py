"""Registered models: creation, shapes, the paper's parameter count, errors."""

import pytest
import timm
import torch

import mhla_image_classification
from mhla_core import MHLA
from mhla_image_classification.models import MODEL_NAMES


def test_every_name_is_registered_and_creates():
    assert len(MODEL_NAMES) == 21
    for name in MODEL_NAMES:
        assert timm.is_model(name), name
        model = timm.create_model(name, num_classes=7)
        assert model.head.out_features == 7


def test_paper_parameter_counts():
    counts = {n: sum(p.numel() for p in timm.create_model(n).parameters())
              for n in ("mhla_deit_tiny_patch16_224", "mhla_deit_small_patch16_224", "mhla_deit_base_patch16_224")}
    assert counts["mhla_deit_tiny_patch16_224"] == 5_793_832
    assert round(counts["mhla_deit_small_patch16_224"] / 1e6, 2) == 22.20
    assert round(counts["mhla_deit_base_patch16_224"] / 1e6, 2) == 86.86


@pytest.mark.parametrize("res,blocks,grid", [(224, 16, (16, 16)), (384, 36, (24, 24)), (512, 64, (32, 32))])
def test_forward_shapes_and_blocks(res, blocks, grid):
    model = timm.create_model(f"mhla_deit_tiny_patch16_{res}", num_classes=5).eval()
    layers = [m for m in model.modules() if isinstance(m, MHLA)]
    assert len(layers) == 12 and all(m.num_blocks == blocks and m.grid == grid for m in layers)
    assert model.pretrained_cfg["input_size"] == (3, res, res)
    with torch.no_grad():
        assert model(torch.randn(2, 3, res, res)).shape == (2, 5)


def test_native_grid_and_linear_baseline():
    native = timm.create_model("mhla_deit_tiny_patch16_224", pad_image=False, normalizer="exact", num_classes=3)
    layer = next(m for m in native.modules() if isinstance(m, MHLA))
    assert layer.grid == (14, 14) and layer.num_blocks == 16 and layer.layout((14, 14)).is_padded
    linear = timm.create_model("linear_deit_tiny_patch16_224", num_classes=3)
    assert all(m.num_blocks == 1 for m in linear.modules() if isinstance(m, MHLA))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert native(x).shape == linear(x).shape == (1, 3)


def test_paper_padding_is_centred_zero_padding():
    model = timm.create_model("mhla_deit_tiny_patch16_224", num_classes=3).eval()
    x = torch.randn(1, 3, 224, 224)
    padded = torch.nn.functional.pad(x, (16, 16, 16, 16))
    embed = model.patch_embed
    with torch.no_grad():
        assert torch.allclose(embed(x), timm.layers.PatchEmbed.forward(embed, padded))


def test_model_kwargs_reach_the_layer():
    model = timm.create_model("mhla_deit_tiny_patch16_384", piece_size=6, transform="cos", normalizer="exact")
    layer = next(m for m in model.modules() if isinstance(m, MHLA))
    assert layer.num_blocks == 16 and layer.normalizer == "exact"


def test_errors():
    with pytest.raises(ValueError, match="not divisible by piece_size=5"):
        timm.create_model("mhla_deit_tiny_patch16_384", piece_size=5, pad_tokens=False)
    with pytest.raises(ValueError, match="not divisible by piece_size=5"):
        timm.create_model("mhla_deit_tiny_patch16_224", piece_size=5)  # 16x16 padded grid
    model = timm.create_model("mhla_deit_tiny_patch16_384", piece_size=5)  # token padding: 24 -> 25
    assert next(m for m in model.modules() if isinstance(m, MHLA)).num_blocks == 25
    assert mhla_image_classification.MODEL_NAMES == MODEL_NAMES
