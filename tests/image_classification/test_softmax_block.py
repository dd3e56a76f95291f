"""The same-block softmax baseline: registered, softmax inside, the MHLA model's block and weights otherwise."""

import inspect
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mhla_core import MHLA
from mhla_image_classification import models
from mhla_image_classification.models import SOFTMAX_BLOCK_NAMES, SoftmaxAttention, SoftmaxBlockAttention
from mhla_image_classification.train import main as train

SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=4, num_classes=3)


def test_names_are_explicit_registered_functions():
    source = inspect.getsource(models)
    assert len(SOFTMAX_BLOCK_NAMES) == 9
    for name in SOFTMAX_BLOCK_NAMES:
        assert f"@register_model\ndef {name}(" in source, name  # findable with grep
        assert timm.is_model(name) and name.replace("softmax_block", "mhla") in timm.list_models("mhla_*")


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_shares_every_non_attention_parameter_with_mhla(size):
    kwargs = dict(depth=2, num_classes=5)  # full width and heads of the size; two blocks keep it quick
    torch.manual_seed(0)
    mhla = timm.create_model(f"mhla_deit_{size}_patch16_224", **kwargs)
    torch.manual_seed(0)
    soft = timm.create_model(f"softmax_block_deit_{size}_patch16_224", **kwargs)
    a, b = mhla.state_dict(), soft.state_dict()
    assert set(a) - set(b) == {f"blocks.{i}.attn.mhla.mixing" for i in range(2)} and set(b) <= set(a)
    for k in b:  # same names, shapes and, from one seed, the same initial values
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert not any(isinstance(m, MHLA) for m in soft.modules())
    assert all(isinstance(blk.attn, SoftmaxBlockAttention) for blk in soft.blocks)


def test_same_padding_and_grid_as_mhla():
    for kwargs in ({}, {"pad_image": False}):
        mhla = timm.create_model("mhla_deit_tiny_patch16_224", depth=1, **kwargs)
        soft = timm.create_model("softmax_block_deit_tiny_patch16_224", depth=1, **kwargs)
        assert type(soft.patch_embed) is type(mhla.patch_embed)
        assert soft.patch_embed.img_size == mhla.patch_embed.img_size == ((224, 224) if kwargs else (256, 256))
        assert soft.blocks[0].attn.mhla.grid == mhla.blocks[0].attn.mhla.grid
        assert soft.num_prefix_tokens == 0 and soft.global_pool == "avg"
    assert timm.create_model("softmax_block_deit_tiny_patch16_512", depth=1).blocks[0].attn.mhla.grid == (32, 32)


def _hand_softmax_block(attn: SoftmaxBlockAttention, x: torch.Tensor) -> torch.Tensor:
    """The block's attention written out: LayerNorm, qkv, q/k RMSNorm, softmax(q k^T / sqrt(d)) v, LePE, proj."""
    s = attn.mhla
    B, N, C = x.shape
    H, D = s.num_heads, C // s.num_heads
    h = F.layer_norm(x, (C,), attn.norm.weight, attn.norm.bias, 1e-5)
    q, k, v = (h @ s.qkv.weight.T).split(C, dim=-1)
    eps = torch.finfo(x.dtype).eps
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * s.q_norm.weight
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * s.k_norm.weight
    out = torch.empty_like(v)
    for head in range(H):
        cols = slice(head * D, (head + 1) * D)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(D)
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        out[..., cols] = (p / p.sum(-1, keepdim=True)) @ v[..., cols]
    grid = v.transpose(1, 2).reshape(B, C, *s.grid)
    lepe = F.conv2d(grid, s.lepe.weight, s.lepe.bias, padding=s.lepe.padding, groups=C)
    out = out + lepe.reshape(B, C, N).transpose(1, 2)
    return out @ s.proj.weight.T + s.proj.bias


def test_attention_is_softmax():
    torch.manual_seed(0)
    model = timm.create_model("softmax_block_deit_tiny_patch16_224", **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():  # move the norms off one and the biases off zero
            p.add_(0.1 * torch.randn_like(p))
    attn = model.blocks[0].attn
    assert isinstance(attn.mhla, SoftmaxAttention) and attn.mhla.grid == (8, 8)
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _hand_softmax_block(attn, x), rtol=1e-5, atol=1e-5)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_trains_one_step_with_the_training_script(image_folder, tmp_path):
    flags = ["--model", "softmax_block_deit_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2",
             "num_heads=2", "patch_size=4", "--data-dir", str(image_folder), "--output", str(tmp_path / "run"),
             "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "1",
             "--workers", "0", "--log-interval", "1", "--device", "cpu", "--seed", "0"]
    torch.manual_seed(0)
    before = timm.create_model("softmax_block_deit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2,
                               patch_size=4, img_size=32, num_classes=3).state_dict()
    metrics = train(flags)
    after = metrics["model"].state_dict()
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"]) and 0 <= metrics["top1"] <= 100
    assert before.keys() == after.keys()
    assert not torch.equal(before["blocks.0.attn.mhla.qkv.weight"], after["blocks.0.attn.mhla.qkv.weight"])


def test_mhla_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="takes no MHLA setting; drop piece_size, normalizer"):
        timm.create_model("softmax_block_deit_tiny_patch16_224", piece_size=2, normalizer="exact")
    with pytest.raises(ValueError, match="lepe_kernel must be an odd int"):
        timm.create_model("softmax_block_deit_tiny_patch16_224", depth=1, lepe_kernel=4)
    assert SoftmaxAttention(8, 2, grid=(2, 2), lepe_kernel=None).lepe is None  # timm drops None kwargs
