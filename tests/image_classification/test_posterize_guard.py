"""The paper's RandAugment policy survives Pillow 13's 0-bit posterize (issue 14, item 7)."""

import argparse

import PIL
import pytest
from PIL import Image
from timm.data import create_transform

from mhla_image_classification.data import build_transforms, guard_posterize, posterize_keeping_zero_bits

POLICY = "rand-m9-mstd0.5-inc1"  # all seven paper configs


def _posterize_op(transform):
    ops = transform.transforms[2].ops  # RandomResizedCrop, flip, RandAugment(ops=...)
    (op,) = [o for o in ops if o.name.startswith("Posterize")]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0  # the draw that reaches 0 bits
    return op


def test_zero_bit_draw_gives_a_black_image_instead_of_raising():
    img = Image.new("RGB", (8, 8), (200, 120, 40))
    raw = _posterize_op(create_transform(32, is_training=True, auto_augment=POLICY))
    if int(PIL.__version__.split(".")[0]) >= 13:  # the crash this guards against
        with pytest.raises(ValueError, match="bits must be between"):
            raw(img)
    guarded_tf = create_transform(32, is_training=True, auto_augment=POLICY)
    assert guard_posterize(guarded_tf) == 1
    out = _posterize_op(guarded_tf)(img)
    assert out.size == img.size and out.mode == "RGB" and out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_other_bit_counts_unchanged():
    img = Image.new("RGB", (4, 4), (201, 123, 45))
    assert posterize_keeping_zero_bits(img, 8) is img
    assert posterize_keeping_zero_bits(img, 4).getpixel((0, 0)) == (192, 112, 32)  # low 4 bits cleared


def test_training_transforms_carry_the_guard():
    args = argparse.Namespace(aa=POLICY, color_jitter=0.3, reprob=0.25, scale_min=0.08, hflip=0.5)
    cfg = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9)
    train_tf, _ = build_transforms(cfg, args)
    (op,) = [o for o in train_tf.transforms[2].ops if o.name.startswith("Posterize")]
    assert op.aug_fn is posterize_keeping_zero_bits
