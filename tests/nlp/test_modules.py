"""The PyTorch twins in mhla_nlp.modules equal fla's own reference functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules.norm.layernorm import rms_norm_ref
from fla.modules.norm.layernorm_gated import rms_norm_ref as rms_norm_gated_ref
from fla.modules.rotary import RotaryEmbedding
from fla.modules.rotary.ops import rotary_embedding_ref

from mhla_nlp.modules import FusedRMSNormGated, GatedMLP, RMSNorm, Rotary


def test_rmsnorm_matches_fla_reference():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    torch.testing.assert_close(norm(x), rms_norm_ref(x, norm.weight, None, eps=1e-6, upcast=True))
    y, res = norm(x, r, True)
    y_ref, res_ref = rms_norm_ref(x, norm.weight, None, residual=r, eps=1e-6, prenorm=True, upcast=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(res, res_ref)


def test_gated_rmsnorm_matches_fla_reference():
    torch.manual_seed(0)
    norm = FusedRMSNormGated(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, g = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    torch.testing.assert_close(norm(x, g), rms_norm_gated_ref(x, norm.weight, None, z=g, eps=1e-6))


def test_gated_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = GatedMLP(32, hidden_ratio=4, hidden_act="swish")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_rotary_matches_fla_reference():
    torch.manual_seed(0)
    d, T = 16, 11
    x = torch.randn(2, T, 3, d)
    inv = RotaryEmbedding(d)._compute_inv_freq()
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    ref = rotary_embedding_ref(x, ang.cos(), ang.sin(), interleaved=False)
    pos = torch.arange(T).expand(2, T)
    torch.testing.assert_close(Rotary(d)(x, pos), ref)
    # explicit offsets: positions 5.. equal the slice of a longer table
    torch.testing.assert_close(Rotary(d)(x[:, 5:], pos[:, 5:]), ref[:, 5:])
