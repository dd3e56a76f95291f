"""The models as a timm user drives them: features_only, forward_intermediates, img_size pairs, set_input_size,
dynamic_img_size, pretrained weights across resolutions, save_for_hf / local-dir, pickling, explicit registration
and eval's list of this package's models. Tiny models (width 32, two blocks); nothing is downloaded."""

import copy
import inspect
import io
import math
import pickle

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models._features import FeatureGetterNet

from mhla_core import MHLA
from mhla_image_classification import models
from mhla_image_classification.eval import throughput
from mhla_image_classification.models import (
    MODEL_NAMES,
    attention_of,
    checkpoint_filter_fn,
    is_package_model,
    resample_mixing,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2)
MHLA_224, LINEAR_224, SOFTMAX_224 = ("mhla_deit_tiny_patch16_224", "linear_deit_tiny_patch16_224",
                                     "softmax_block_deit_tiny_patch16_224")
KINDS = [MHLA_224, LINEAR_224, SOFTMAX_224]


def _tiny(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny model in eval mode; its mixing matrices are moved off their smooth init (uniform in [0, 1])."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **TINY, **{"num_classes": 3, **kwargs}).eval()
    with torch.no_grad():
        for layer in _layers(model):
            layer.mixing.uniform_(0, 1)
    return model


def _layers(model: torch.nn.Module) -> list[MHLA]:
    return [m for m in model.modules() if isinstance(m, MHLA)]


def _image(*size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-6, msg=k)


# features_only (timm's FeatureGetterNet over forward_intermediates)

@pytest.mark.parametrize("name", KINDS)
def test_features_only_gives_the_feature_maps_of_the_blocks(name):
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, out_indices=(0, 1), **TINY)
    assert isinstance(feats, FeatureGetterNet)
    info = feats.feature_info
    assert info.channels() == [32, 32] and info.reduction() == [16, 16] and info.module_name() == ["blocks.0",
                                                                                                  "blocks.1"]
    with torch.no_grad():
        out = feats(_image(224, 224))
    assert [tuple(o.shape) for o in out] == [(1, 32, 14, 14)] * 2  # 224 / reduction 16
    default = timm.create_model(name, features_only=True, **{**TINY, "depth": 4})  # timm's ViT default: last 3
    assert default.feature_info.module_name() == ["blocks.1", "blocks.2", "blocks.3"]


# forward_intermediates: every grid, padded tokens cropped

@pytest.mark.parametrize("name,size,grid,keep", [
    (MHLA_224, (224, 224), (16, 16), (slice(1, 15), slice(1, 15))),      # 224 padded to 256: a ring of padding
    (SOFTMAX_224, (224, 224), (16, 16), (slice(1, 15), slice(1, 15))),
    (LINEAR_224, (224, 224), (14, 14), (slice(None), slice(None))),      # no image padding
    (MHLA_224, (224, 320), (16, 20), (slice(1, 15), slice(None))),        # only the 224 axis is padded
    ("mhla_deit_tiny_patch16_384", (384, 384), (24, 24), (slice(None), slice(None))),
])
def test_forward_intermediates_are_the_block_outputs_on_the_image_tokens(name, size, grid, keep):
    model = _tiny(name, img_size=size)
    x = _image(*size, batch=2)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o)) for blk in model.blocks]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
    for h in hooks:
        h.remove()
    expected = [o.reshape(2, *grid, 32)[:, keep[0], keep[1]].permute(0, 3, 1, 2) for o in seen]
    rows, cols = size[0] // 16, size[1] // 16
    assert [tuple(t.shape) for t in inter] == [(2, 32, rows, cols)] * 2
    for got, want in zip(inter, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # the final features keep every token, padding included: what the head pools
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", norm=True, intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, rows * cols, 32)
    torch.testing.assert_close(nlc[0], model.norm(expected[1].flatten(2).transpose(1, 2)))


# img_size as a pair, non-square grids

@pytest.mark.parametrize("name", KINDS)
def test_img_size_takes_a_pair(name):
    square = _tiny(name)
    for size in ((224, 224), [224, 224]):  # a list is what a JSON config gives back
        pair = _tiny(name, img_size=size)
        _assert_same_weights(square, pair)
        with torch.no_grad():
            torch.testing.assert_close(pair(_image(224, 224)), square(_image(224, 224)), rtol=0, atol=0)


def test_non_square_images():
    model = _tiny(MHLA_224, img_size=(224, 320))
    assert model.patch_embed.grid_size == (16, 20)  # only the 224 side is padded (to 256)
    assert all(m.grid == (16, 20) and m.blocks == (4, 5) for m in _layers(model))
    with torch.no_grad():
        assert model(_image(224, 320)).shape == (1, 3)
    soft = _tiny(SOFTMAX_224, img_size=(320, 224))
    assert all(blk.attn.mhla.grid == (20, 16) for blk in soft.blocks)
    native = _tiny(MHLA_224, img_size=(224, 320), pad_image=False)  # token padding: 14 -> 16 on one axis
    assert all(m.grid == (14, 20) and m.blocks == (4, 5) for m in _layers(native))


def test_img_size_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"img_size must be an int or a pair \(height, width\)"):
        timm.create_model(MHLA_224, img_size=(224, 224, 3), **TINY)
    with pytest.raises(ValueError, match="img_size 300 is not a multiple of patch_size 16"):
        timm.create_model(MHLA_224, img_size=(224, 300), **TINY)
    with pytest.raises(ValueError, match="a 24x25 patch grid is not divisible by piece_size=4 and token padding"):
        timm.create_model("mhla_deit_tiny_patch16_384", img_size=(384, 400), pad_tokens=False, **TINY)
    with pytest.raises(ValueError, match="class_token must be False"):
        timm.create_model(MHLA_224, class_token=True, **TINY)
    with pytest.raises(ValueError, match="attention is set by the model name"):
        timm.create_model(MHLA_224, attention="softmax", **TINY)
    torch.manual_seed(0)
    plain = timm.create_model(MHLA_224, **TINY)
    torch.manual_seed(0)
    fixed = timm.create_model(MHLA_224, fix_init=True, **TINY)  # timm's option reaches the block's projections
    torch.testing.assert_close(fixed.blocks[1].attn.mhla.proj.weight, plain.blocks[1].attn.mhla.proj.weight / 2)


# set_input_size and dynamic_img_size rebuild the block layout; the mixing is resampled over the block grid

@pytest.mark.parametrize("name", KINDS)
def test_set_input_size_moves_every_layer_to_the_new_grid(name):
    small = _tiny(name)
    model = copy.deepcopy(small)
    model.set_input_size(img_size=384)
    old_grid = (14, 14) if name == LINEAR_224 else (16, 16)
    assert model.patch_embed.grid_size == (24, 24)
    assert all(blk.attn.mhla.grid == (24, 24) for blk in model.blocks)
    torch.testing.assert_close(model.pos_embed, resample_abs_pos_embed(small.pos_embed, (24, 24), old_grid,
                                                                       num_prefix_tokens=0))
    for old, new in zip(_layers(small), _layers(model)):
        assert new.blocks == ((1, 1) if name == LINEAR_224 else (6, 6))  # the block size is kept: 4x4 tokens
        torch.testing.assert_close(new.mixing, resample_mixing(old.mixing, old.blocks, new.blocks))
        assert isinstance(new.mixing, torch.nn.Parameter) and new.mixing.requires_grad
    # the model at 384 px with these weights
    ref = timm.create_model(name, img_size=384, **TINY, num_classes=3).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(_image(384, 384)), ref(_image(384, 384)), rtol=0, atol=0)
    assert timm.models.get_model_args(model)["img_size"] == (384, 384)
    model.set_input_size(img_size=(224, 224))  # and back: 224 is padded to 256 again
    assert model.patch_embed.grid_size == old_grid and model.pos_embed.shape == small.pos_embed.shape
    with torch.no_grad():
        assert model(_image(224, 224)).shape == (1, 3)


@pytest.mark.parametrize("name", KINDS)
def test_dynamic_img_size_equals_set_input_size(name):
    static = _tiny(name)
    dynamic = _tiny(name, dynamic_img_size=True)
    _assert_same_weights(static, dynamic)
    for size in ((224, 224), (384, 384), (224, 320), (192, 160)):
        ref = copy.deepcopy(static)
        ref.set_input_size(img_size=size)
        with torch.no_grad():
            torch.testing.assert_close(dynamic(_image(*size)), ref(_image(*size)), rtol=1e-5, atol=1e-5)
        inter = dynamic.forward_intermediates(_image(*size), intermediates_only=True)
        assert inter[0].shape == (1, 32, size[0] // 16, size[1] // 16)
    dynamic.train()
    dynamic(_image(384, 384)).sum().backward()  # the stored mixing learns through the resampling
    assert all(m.mixing.grad is not None and m.mixing.grad.abs().sum() > 0 for m in _layers(dynamic))


def test_resample_mixing_is_bilinear_over_the_query_and_the_key_block_grids():
    def axis(n: int, m: int) -> torch.Tensor:  # [m, n] linear interpolation, align_corners=False, edges clamped
        a = torch.zeros(m, n, dtype=torch.float64)
        for k in range(m):
            src = min(max((k + 0.5) * n / m - 0.5, 0.0), n - 1)
            lo = math.floor(src)
            a[k, lo] += 1 - (src - lo)
            a[k, min(lo + 1, n - 1)] += src - lo
        return a

    torch.manual_seed(0)
    for old, new in (((2, 2), (3, 4)), ((4, 4), (6, 6)), ((6, 6), (4, 4)), ((1, 1), (2, 3))):
        w = torch.rand(2, math.prod(old), math.prod(old), dtype=torch.float64)  # one matrix per head
        k = torch.kron(axis(old[0], new[0]), axis(old[1], new[1]))
        got = resample_mixing(w, old, new)
        torch.testing.assert_close(got, k @ w @ k.T)
        assert got.min() >= w.min() - 1e-12 and got.max() <= w.max() + 1e-12  # convex combinations: clamp01 holds
    w = torch.rand(16, 16)
    assert resample_mixing(w, (4, 4), (4, 4)) is w
    with pytest.raises(ValueError, match=r"mixing .* does not fit the block grid \(3, 3\)"):
        resample_mixing(w, (3, 3), (4, 4))


# pretrained weights of another resolution (pretrained_cfg file + the registered checkpoint_filter_fn)

@pytest.mark.parametrize("src,dst", [(MHLA_224, "mhla_deit_tiny_patch16_384"),
                                     ("mhla_deit_tiny_patch16_384", MHLA_224),
                                     (SOFTMAX_224, "softmax_block_deit_tiny_patch16_512")])
def test_pretrained_weights_of_another_resolution_load(tmp_path, src, dst):
    source = _tiny(src)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = timm.create_model(dst, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3), **TINY,
                              num_classes=3)
    ref = copy.deepcopy(source)  # the same as moving the source model to the new size
    ref.set_input_size(img_size=model.pretrained_cfg["input_size"][1:])
    _assert_same_weights(model, ref)
    again = timm.create_model(dst, **TINY, num_classes=3)
    timm.models.load_checkpoint(again, str(path), filter_fn=checkpoint_filter_fn)
    _assert_same_weights(again, ref)


# save_for_hf, then timm.create_model("local-dir:...")

@pytest.mark.parametrize("name,kwargs", [(MHLA_224, dict(piece_size=2, img_size=(224, 224), normalizer="exact")),
                                         (LINEAR_224, {}), (SOFTMAX_224, dict(pad_image=False, lepe_kernel=3))])
def test_save_for_hf_round_trip(tmp_path, name, kwargs):
    model = _tiny(name, **kwargs)
    timm.models.save_for_hf(model, str(tmp_path))
    back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    _assert_same_weights(model, back)
    with torch.no_grad():
        torch.testing.assert_close(back(_image(224, 224)), model(_image(224, 224)), rtol=0, atol=0)


def test_save_for_hf_after_set_input_size(tmp_path):
    model = _tiny(MHLA_224)
    model.set_input_size(img_size=384)
    timm.models.save_for_hf(model, str(tmp_path))
    back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert back.patch_embed.grid_size == (24, 24) and all(m.blocks == (6, 6) for m in _layers(back))
    with torch.no_grad():
        torch.testing.assert_close(back(_image(384, 384)), model(_image(384, 384)), rtol=0, atol=0)


# pickling (torch.save of a whole model)

@pytest.mark.parametrize("name", KINDS)
def test_models_pickle(name):
    model = _tiny(name)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for back in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert type(back) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(back(_image(224, 224)), model(_image(224, 224)), rtol=0, atol=0)


# registration and eval's list of this package's models

def test_every_name_is_an_explicit_registered_function():
    source = inspect.getsource(models)
    assert len(MODEL_NAMES) == 21
    for name in MODEL_NAMES:
        assert f"@register_model\ndef {name}(" in source, name  # findable with grep
        assert timm.models.model_entrypoint(name).__doc__, name


def test_eval_recognises_every_model_of_the_package():
    assert all(is_package_model(name) for name in MODEL_NAMES)
    assert not is_package_model("deit_tiny_patch16_224") and not is_package_model("no_such_model")
    assert [attention_of(n) for n in (MHLA_224, LINEAR_224, SOFTMAX_224, "deit_tiny_patch16_224")] == [
        "mhla", "linear", "softmax", None]
    kwargs = dict(**TINY, num_classes=3, pad_image=False, lepe_kernel=3)  # both change the parameter count
    rows = throughput([SOFTMAX_224], 1, torch.device("cpu"), 1, None, {**kwargs, "piece_size": 2})
    expected = sum(p.numel() for p in timm.create_model(SOFTMAX_224, **kwargs).parameters()) / 1e6
    assert rows[0]["params_m"] == expected  # pad_image and lepe_kernel reached it; the MHLA op's piece_size not
