"""`mhla_core.compile`: --compile full / blocks on tiny models (CPU, aot_eager: the graphs, not the codegen)."""

from __future__ import annotations

import argparse
import copy

import pytest
import timm
import torch

import mhla_image_classification  # noqa: F401  (registers the models with timm)
from mhla_core.compile import add_compile_args, compile_model, compile_settings, repeated_blocks

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=64, num_classes=5)


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("mhla_deit_tiny_patch16_224", **TINY)


def _train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("how", ["full", "blocks"])
def test_compiled_training_step_equals_eager(how):
    """One training step of the compiled MHLA DeiT equals eager within fp32 rounding, and the state dict keys
    stay the same (compiled in place)."""
    eager = _model()
    compiled = compile_model(copy.deepcopy(eager), how, backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 5, (2,), generator=g)
    loss_e, state_e = _train_step(eager, x, y)
    loss_c, state_c = _train_step(compiled, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for k in state_e:
        torch.testing.assert_close(state_c[k], state_e[k], rtol=1e-5, atol=1e-6)


def test_blocks_are_found_and_errors_name_the_choice():
    assert len(repeated_blocks(_model())) == TINY["depth"]
    with pytest.raises(ValueError, match="--compile full"):
        compile_model(torch.nn.Linear(2, 2), "blocks")
    with pytest.raises(ValueError, match="how must be one of"):
        compile_model(_model(), "regional")


def test_diffusers_models_use_their_repeated_blocks():
    """A model that declares `_repeated_blocks` is compiled by its own `compile_repeated_blocks`."""

    class Regional(torch.nn.Module):
        _repeated_blocks = ["Linear"]

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.calls = []

        def compile_repeated_blocks(self, **kwargs):
            self.calls.append(kwargs)

    m = Regional()
    assert compile_model(m, "blocks", backend="aot_eager") is m and m.calls == [{"backend": "aot_eager"}]


def test_flags_and_timm_spelling():
    p = argparse.ArgumentParser()
    add_compile_args(p, timm_spelling=True)
    assert compile_settings(p.parse_args([])) == ("none", "inductor", None)
    assert compile_settings(p.parse_args(["--compile"])) == ("full", "inductor", None)
    assert compile_settings(p.parse_args(["--compile", "blocks", "--compile-backend", "aot_eager"]))[:2] == (
        "blocks", "aot_eager")
    assert compile_settings(p.parse_args(["--torchcompile"])) == ("full", "inductor", None)
    assert compile_settings(p.parse_args(["--torchcompile", "aot_eager"]))[:2] == ("full", "aot_eager")
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "regional"])


def test_no_graph_break_in_mhla_models():
    """Dynamo traces the MHLA DeiT and the MHLA DiT whole: the op and the layer break no graph."""
    from mhla_dit.models import create_model

    torch._dynamo.reset()
    deit = torch._dynamo.explain(_model())(torch.randn(2, 3, 64, 64))
    dit = create_model("DiT-S/2", input_size=8, attention="mhla", block_size=4, hidden_size=64, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(0)
    dit_explained = torch._dynamo.explain(dit)(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 500]),
                                                torch.tensor([1, 7]))
    assert deit.graph_break_count == 0, deit.break_reasons
    assert dit_explained.graph_break_count == 0, dit_explained.break_reasons
