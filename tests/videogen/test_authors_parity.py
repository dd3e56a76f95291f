"""End to end against the authors' own Wan-MHLA code: their model -> our converter -> same output.

Needs their release: set MHLA_AUTHORS_REPO to a git clone (or bare mirror) of DAGroup-PKU/MHLA; skipped otherwise.
Their softmax attention (flash-attn, CUDA only) is replaced by SDPA; everything else is their code.
"""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from mhla_videogen.convert import convert_released
from tests.authors_release import extract, load_module, package


def _sdpa(q, k, v, q_lens=None, k_lens=None, **kw):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.fixture
def authors(tmp_path, monkeypatch):
    wan = "mhla_videogen/diffusion/model/wan"
    root = extract(tmp_path, wan) / wan

    def stub(name, **attrs):
        m = package(name, **attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    def any_(*a, **k):
        return None

    log = logging.getLogger("authors")
    for name in ("diffusion", "diffusion.model", "diffusion.utils"):
        stub(name)
    stub("diffusion.model.basic_modules", GLUMBConv=any_, GLUMBConv3D=any_, GLUMBConvTemp=any_, Mlp=any_)
    stub("diffusion.model.utils", auto_grad_checkpoint=lambda f, *a, **k: f(*a, **k),
         create_block_mask_cached=None, generate_temporal_head_mask_mod=None)
    stub("diffusion.utils.logger", LogBuffer=any_, get_logger=lambda *a, **k: log, get_root_logger=lambda *a, **k: log)
    stub("diffusion.model.wan").__path__ = [str(root)]
    stub("diffusion.model.wan.attention", block_sparse_attention=None, flash_attention=_sdpa)
    mods = {}
    for name in ("mhla_utils", "model"):
        mods[name] = load_module(monkeypatch, f"diffusion.model.wan.{name}", root / f"{name}.py")
    mods["model"].flash_attention = _sdpa
    return mods["model"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("gated,layers", [(True, [1, 2]), (False, [0, 1, 2])], ids=["gated-hybrid", "plain-full"])
def test_converted_authors_model_matches_their_forward(authors, gated, layers):
    torch.manual_seed(0)
    theirs = authors.WanLinearAttentionModel(
        model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=64, ffn_dim=96, freq_dim=32, text_dim=16,
        out_dim=4, num_heads=2, num_layers=3, linear_attn_idx=layers, attn_type="mhla_uni", rope_after=True,
        rms_output=True, norm_output=False, is_gated=gated,
    ).eval()
    sd = theirs.state_dict()
    # their positional slip: every MHLA weight not loaded from Wan starts at 1e-6
    assert torch.all(sd[f"blocks.{layers[0]}.self_attn.block_attn.conv.weight"] == 1e-6)
    assert (f"blocks.{layers[0]}.self_attn.g.weight" in sd) == gated
    with torch.no_grad():  # make every parameter matter
        for n, p in theirs.named_parameters():
            if "norm" in n or "modulation" in n or p.abs().max() < 1e-5:
                p.copy_(torch.randn_like(p) * (0.2 if "block_attn" in n else 1.0) + (1.0 if "norm" in n else 0.0))
    ours = convert_released({k: v.clone() for k, v in theirs.state_dict().items()}).eval()
    assert ours.config.mhla_layers == layers and ours.config.mhla_gated == gated
    x, t, ctx = torch.randn(1, 4, 3, 10, 20), torch.tensor([300.0]), torch.randn(1, 8, 16)  # token grid (3, 5, 10)
    with torch.no_grad():
        a = theirs(list(x), t, list(ctx), seq_len=150)
        b = ours(x, t, ctx).sample
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
