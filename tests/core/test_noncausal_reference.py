"""mhla(backend="torch") against the float64 per-token brute force (docs/spec.md section 1)."""

import pytest
import torch

from mhla_core import mhla
from tests.core.brute import brute_mhla
from tests.core.errors import rel_err


def _inputs(B, M, L, H, Dk, Dv, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    N = M * L
    q = torch.rand(B, N, H, Dk, dtype=torch.float64, generator=g)
    k = torch.rand(B, N, H, Dk, dtype=torch.float64, generator=g)
    v = torch.randn(B, N, H, Dv, dtype=torch.float64, generator=g)
    shape = (H, M, M) if per_head else (M, M)
    W = torch.rand(*shape, dtype=torch.float64, generator=g)
    return q, k, v, W


CASES = [  # (M, L, per_head, normalize, normalizer, scale)
    (1, 5, False, True, "exact", None),
    (1, 4, False, True, "reference", 1.0),
    (3, 4, False, True, "exact", None),
    (3, 4, True, True, "reference", None),
    (4, 3, False, True, "reference", 1.0),
    (4, 3, True, True, "exact", 1.0),
    (2, 6, False, False, "exact", None),
    (5, 2, True, False, "exact", 1.0),
]


@pytest.mark.parametrize("M,L,per_head,normalize,normalizer,scale", CASES)
def test_forward_matches_brute_force(M, L, per_head, normalize, normalizer, scale):
    q, k, v, W = _inputs(2, M, L, 2, 3, 4, per_head, seed=M * 10 + L)
    out = mhla(q, k, v, W, block_size=L, normalize=normalize, normalizer=normalizer, scale=scale,
               backend="torch")
    ref = brute_mhla(q, k, v, W, (M * L,), (M,), normalize, normalizer, scale=scale)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-9


@pytest.mark.parametrize("M,L,per_head,normalize,normalizer,scale", CASES[2:6])
def test_gradients_match_brute_force(M, L, per_head, normalize, normalizer, scale):
    q, k, v, W = _inputs(1, M, L, 2, 3, 2, per_head, seed=M + L)
    leaves = [t.requires_grad_() for t in (q, k, v, W)]
    dout = torch.randn(1, M * L, 2, 2, dtype=torch.float64)
    out = mhla(*leaves, block_size=L, normalize=normalize, normalizer=normalizer, scale=scale, backend="torch")
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    ref = brute_mhla(*leaves, (M * L,), (M,), normalize, normalizer, scale=scale)
    ref_grads = torch.autograd.grad((ref * dout).sum(), leaves)
    for name, g, r in zip("qkvW", grads, ref_grads):
        assert rel_err(g, r) < 1e-9, name


def test_half_inputs_accumulate_in_fp32():
    q, k, v, W = _inputs(2, 4, 16, 2, 8, 8, False, seed=3)
    out = mhla(q.bfloat16(), k.bfloat16(), v.bfloat16(), W.float(), block_size=16, backend="torch")
    ref = mhla(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), W.float().double(),
               block_size=16, backend="torch")
    assert out.dtype == torch.bfloat16
    assert rel_err(out.double(), ref) < 1e-2


def test_vanilla_linear_attention_is_one_block():
    q, k, v, _ = _inputs(1, 1, 10, 2, 4, 4, False, seed=4)
    out = mhla(q, k, v, torch.ones(1, 1, dtype=torch.float64), block_size=10, backend="torch")
    s = 4**-0.5
    num = torch.einsum("bnhk,bmhk,bmhv->bnhv", s * q, k, v)
    den = torch.einsum("bnhk,bmhk->bnh", s * q, k) + 1e-6
    assert rel_err(out, num / den.unsqueeze(-1)) < 1e-12


def test_nan_stays_in_its_batch_entry():
    q, k, v, W = _inputs(2, 2, 4, 1, 4, 4, False, seed=5)
    q[0, 1, 0, 0] = float("nan")
    out = mhla(q, k, v, W, block_size=4, backend="torch")
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()
