"""The mixing constraint holds whoever trains the model: a plain loop, timm's optimiser and loss scaler,
accelerate's wrapped optimiser, transformers' Trainer; no call to `constrain_mixing` anywhere here."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import mhla_image_classification  # noqa: F401  (registers the models with timm)
from mhla_core import MHLA

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_classes=3, piece_size=1)  # 2 x 2 blocks


def _vit():
    torch.manual_seed(0)  # the push-out checks below depend on the initial weights
    return timm.create_model("mhla_deit_tiny_patch16_224", **TINY)


def _mixings(model):
    return [m.mixing for m in model.modules() if isinstance(m, MHLA)]


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _assert_in_range(model):
    ws = _mixings(model)
    assert ws and all(float(w.min()) >= 0.0 and float(w.max()) <= 1.0 for w in ws)


def _pushed_out(model, step):
    """A huge-LR step must have moved W outside [0, 1] without the projection (checked on a twin)."""
    twin = copy.deepcopy(model)  # deep copies are not registered: the twin shows the raw update
    step(twin)
    return any(float(w.min()) < 0 or float(w.max()) > 1 for w in _mixings(twin))


def test_plain_loop_with_sgd():
    model = _vit()
    x, y = _data()

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e3)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    assert _pushed_out(model, step)
    for _ in range(3):
        step(model)
        _assert_in_range(model)


def test_timm_optimizer_and_loss_scaler():
    """As timm's train.py runs a model: create_optimizer_v2 and NativeScaler (scaler(loss, optimizer))."""
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler

    model = _vit()
    opt = create_optimizer_v2(model, "adamw", lr=5.0, weight_decay=0.05)
    scaler = NativeScaler(device="cpu")
    for seed in range(3):
        x, y = _data(seed)
        opt.zero_grad()
        scaler(torch.nn.functional.cross_entropy(model(x), y), opt, clip_grad=None, parameters=model.parameters())
        _assert_in_range(model)


def test_accelerate_wrapped_optimizer():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = _vit()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=1e3))
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        acc.backward(torch.nn.functional.cross_entropy(model(x), y))
        opt.step()
        _assert_in_range(model)


def test_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    class Images(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x, y = _data(i, 1)
            return {"pixel_values": x[0], "labels": y[0]}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _vit()

        def forward(self, pixel_values, labels):
            logits = self.net(pixel_values)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = Wrapped()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=50.0, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", lr_scheduler_type="constant", warmup_steps=0)
    transformers.Trainer(model=model, args=args, train_dataset=Images()).train()
    _assert_in_range(model.net)


def test_frozen_and_unconstrained_mixings_are_left_alone():
    m = MHLA(16, 2, grid=(4, 4), blocks=(2, 2), mixing_constraint="none")
    opt = torch.optim.SGD(m.parameters(), lr=1e3)
    m(torch.randn(1, 16, 16)).square().sum().backward()
    opt.step()
    assert float(m.mixing.min()) < 0 or float(m.mixing.max()) > 1  # "none" is not projected


def test_transformers_trainer_keeps_the_lm_mixing_in_range(tmp_path):
    """The LM's [1e-5, 1] clamp and lower triangle hold under transformers.Trainer (issue 15: it took W to
    [-0.92, 0.33] before)."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    from mhla_nlp.zoo import build_model

    model = build_model("mhla", dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=64, chunk_size=8,
                                     max_chunks=8))

    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(3, 64, (32,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=50.0, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", lr_scheduler_type="constant", warmup_steps=0)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    ws = [m.mixing_matrix for m in model.modules() if hasattr(m, "mixing_matrix")]
    assert ws
    for w in ws:
        lower = torch.ones_like(w, dtype=torch.bool).tril()
        assert float(w[lower].min()) >= float(torch.tensor(1e-5)) and float(w[lower].max()) <= 1.0
        assert not w[~lower].any()
