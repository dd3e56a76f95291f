"""The parallel (quadratic) path of non-causal MHLA and the planner (on CPU under the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mhla_core import NoncausalConfig, mhla  # noqa: E402
from mhla_core.ops.noncausal import parallel as P  # noqa: E402
from mhla_core.ops.noncausal.plan import choose_path, gather_in_kernel  # noqa: E402
from tests.core.errors import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMS = [(True, "exact"), (True, "reference"), (False, "exact")]


def _tiles(bq: int, bk: int, **kw) -> P.ParallelTiles:
    return P.ParallelTiles(bq, bk, 4, 1, bq, bk, 4, 1, bq, bk, 4, 1, **kw)


def _errors(B, H, M, L, Dk, Dv, per_head, normalize, normalizer, tiles, dtype=torch.float32, layout="bnhd",
            seed=0):
    """Relative errors of o, dq, dk, dv, dW of the forced parallel path against float64."""
    g = torch.Generator().manual_seed(seed)
    N = M * L
    q, k = (torch.rand(B, N, H, Dk, generator=g) for _ in range(2))
    v, do = (torch.randn(B, N, H, Dv, generator=g) for _ in range(2))
    w = torch.rand(*((H, M, M) if per_head else (M, M)), generator=g)
    kw = dict(block_size=L, normalize=normalize, normalizer=normalizer)
    cfg = NoncausalConfig(path="parallel", parallel=tiles)
    res = []
    for dt, backend in ((dtype, "triton"), (torch.float64, "torch")):
        xs = [t.to(DEVICE, dt) for t in (q, k, v)]
        if layout == "bhnd" and backend == "triton":  # [B, H, N, D] storage viewed as [B, N, H, D]
            xs = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in xs]
            assert not xs[0].is_contiguous()
        leaves = [t.requires_grad_() for t in xs] + [w.to(DEVICE, torch.float32 if dt != torch.float64
                                                          else dt).requires_grad_()]
        o = mhla(*leaves, backend=backend, config=cfg if backend == "triton" else None, **kw)
        res.append([o, *torch.autograd.grad(o, leaves, do.to(DEVICE, o.dtype))])
    errs = [rel_err(a, b) for a, b in zip(*res)]
    assert all(e == e for e in errs), errs  # no NaN
    return errs


@pytest.mark.parametrize("normalize,normalizer", NORMS)
@pytest.mark.parametrize("w_mode,bq,bk,L", [
    ("onehot", 16, 16, 6),  # tiles cross block boundaries
    ("onehot", 32, 16, 10),
    ("gather", 16, 32, 6),
    ("row", 32, 32, 16),  # 16-key tiles, 2 blocks per query tile
    ("auto", 16, 16, 32),  # scalar: every tile pair inside one block pair
    ("blocks", 16, 16, 4),  # 4 x 4 blocks per tile pair, applied to a 4D view of the scores
    ("blocks", 16, 32, 8),
    ("expand", 32, 16, 4),  # the same W entries broadcast to a tile
    ("dense", 16, 16, 6),  # token-pair W: any block size
    ("blocks", 16, 16, 6),  # not block-aligned: falls back to the one-hot products
])
@pytest.mark.parametrize("dw_mode", ["onehot", "reshape"])
def test_w_modes_match_float64(w_mode, bq, bk, L, normalize, normalizer, dw_mode):
    if dw_mode == "reshape" and not (normalize and normalizer == "exact"):
        pytest.skip("the dW block sums do not depend on the normaliser: one normaliser covers them")
    tiles = _tiles(bq, bk, w_mode=w_mode, dw_mode=dw_mode)
    errs = _errors(2, 2, 4, L, 16, 24, True, normalize, normalizer, tiles)
    assert max(errs) < 1e-4, errs


@pytest.mark.parametrize("w_mode,dw_mode", [("blocks", "reshape"), ("dense", "onehot")])
def test_w_modes_shared_w_with_padded_tiles(w_mode, dw_mode):
    """Shared W, N not a multiple of the tiles (M = 5 blocks of 4: the last tile is half empty)."""
    errs = _errors(2, 3, 5, 4, 16, 16, False, True, "exact", _tiles(16, 16, w_mode=w_mode, dw_mode=dw_mode))
    assert max(errs) < 1e-4, errs


def test_w_mode_choice():
    assert P._tiles_for(_tiles(64, 64), 64, 64, 1024, 16)[2:] == (P.W_BLOCKS, 16)  # block-aligned
    assert P._tiles_for(_tiles(64, 64), 64, 64, 1000, 25)[2] == P.W_ONEHOT
    assert P._tiles_for(_tiles(64, 64, w_mode="onehot"), 64, 64, 1024, 16)[2:] == (P.W_ONEHOT, 16)
    assert P._tiles_for(_tiles(64, 64), 64, 64, 1024, 64)[2] == P.W_SCALAR
    assert P._tiles_for(_tiles(64, 64, w_mode="row"), 64, 64, 1024, 16)[1:3] == (16, P.W_ROW)
    assert P._tiles_for(_tiles(64, 64, w_mode="gather"), 64, 64, 1000, 25)[2] == P.W_GATHER
    assert P._tiles_for(_tiles(64, 64, w_mode="blocks"), 64, 64, 1024, 16)[2] == P.W_BLOCKS
    assert P._tiles_for(_tiles(64, 64, w_mode="blocks"), 64, 64, 1000, 25)[2] == P.W_ONEHOT  # not aligned
    assert P._tiles_for(_tiles(64, 64, w_mode="dense"), 64, 64, 1000, 25)[2] == P.W_DENSE
    assert P._block_consts(_tiles(64, 64, dw_mode="reshape"), 64, 64, 16, P.W_ONEHOT, True) == dict(LB=16, DWR=True)
    assert P._block_consts(_tiles(64, 64, dw_mode="reshape"), 64, 64, 64, P.W_SCALAR, True)["DWR"] is False


def test_dense_mixing_is_w_per_token_pair():
    w = torch.rand(2, 3, 3)
    wx, sx = P.dense_mixing(w, w.stride(0), 4, 12)
    blk = torch.arange(12) // 4
    assert torch.equal(wx, w[:, blk][:, :, blk]) and sx == 144
    assert P.dense_mixing(w[0], 0, 4, 12)[1] == 0 and P.dense_mixing(w[0], 0, 4, 12)[0].shape == (12, 12)


@pytest.mark.parametrize("dtype,normalizer", [(torch.bfloat16, "exact"), (torch.bfloat16, "reference"),
                                              (torch.float16, "exact")])
def test_half_inputs_and_bhnd_layout(dtype, normalizer):
    errs = _errors(1, 3, 4, 16, 32, 32, False, True, normalizer, _tiles(32, 32), dtype=dtype, layout="bhnd")
    assert max(errs) < 2e-2, errs


@pytest.mark.parametrize("split", [False, True])
def test_head_dim_72_padded_or_split(split):
    """D = 72 padded to 128 (default) or split into 64 + a 16 tail (correct here; off on GPUs, see kernels.md)."""
    assert P.split_dim(72) == (64, 16) and P.split_dim(96) == (64, 32) and P.split_dim(128) == (128, 0)
    errs = _errors(1, 2, 2, 16, 72, 72, False, True, "exact", _tiles(16, 16, split_dims=split))
    assert max(errs) < 1e-4, errs


@pytest.mark.parametrize("split_tail,min_tail", [("window", 16), ("mask", 32), ("window", 32)])
def test_head_dim_72_split_tail_settings(split_tail, min_tail):
    """The tail tile as a window of real columns and/or 32 wide: equal to float64 here (GPU: docs/kernels.md)."""
    tiles = _tiles(16, 16, split_dims=True, split_tail=split_tail, split_min_tail=min_tail)
    errs = _errors(1, 2, 2, 16, 72, 72, False, True, "exact", tiles)
    assert max(errs) < 1e-4, errs


def test_outputs_keep_the_input_layout():
    """o of [B, H, N, D]-stored inputs comes back in that storage (no hidden copy)."""
    q = torch.rand(1, 2, 32, 16).transpose(1, 2)  # [B, N, H, D] view of [B, H, N, D]
    o = mhla(q, q, q, torch.rand(2, 2), block_size=16, backend="triton",
             config=NoncausalConfig(path="parallel", parallel=_tiles(16, 16)))
    assert o.stride() == q.stride()


def test_planner_choice_at_paper_shapes():
    """Cost-model choices fitted on the H200 (docs/kernels.md): parallel for short sequences."""
    cfg = NoncausalConfig()
    for (B, H, N, D, M), want in [
        ((128, 3, 256, 64, 16), "parallel"),  # DeiT-T
        ((32, 16, 256, 72, 16), "parallel"),  # DiT-XL/2 256
        ((8, 12, 1024, 128, 16), "parallel"),  # 1K tokens, L = 64
        ((16, 16, 1024, 72, 64), "state"),  # DiT-XL/2 512
        ((1, 12, 4096, 128, 64), "state"),
        ((1, 12, 31500, 128, 150), "state"),  # Wan 480p
    ]:
        assert choose_path(B, H, N, N // M, D, D, 2, cfg) == want, (B, H, N, D, M)
    assert choose_path(128, 3, 256, 256 // 16, 64, 64, 2, NoncausalConfig(path="state")) == "state"
    # head dims above 128 (fp32 parallel tiles overflowed shared memory on the H200): the state path
    assert choose_path(1, 2, 768, 256, 256, 256, 4, cfg) == "state"
    assert choose_path(1, 2, 768, 256, 128, 128, 4, cfg) == "parallel"


def test_grid_gather_setting():
    """DiT-XL/2 256 (head dim 72, parallel path): permuted first by the measured rule, unless the config says."""
    dit = (32, 16, 256, 16, 72, 72, 2)
    assert gather_in_kernel(*dit, NoncausalConfig()) is False
    assert gather_in_kernel(*dit, NoncausalConfig(grid_gather="always")) is True
    assert gather_in_kernel(128, 3, 256, 16, 64, 64, 2, NoncausalConfig(grid_gather="never")) is False


def test_config_errors():
    with pytest.raises(ValueError, match="path must be one of"):
        NoncausalConfig(path="fast")
    with pytest.raises(ValueError, match="fwd_bq must be a power of two"):
        P.ParallelTiles(fwd_bq=48)
    with pytest.raises(ValueError, match="w_mode must be"):
        P.ParallelTiles(w_mode="sparse")
    with pytest.raises(ValueError, match="dw_mode must be"):
        P.ParallelTiles(dw_mode="blocks")
    with pytest.raises(ValueError, match="grid_gather must be one of"):
        NoncausalConfig(grid_gather="sometimes")
    q = torch.rand(1, 32, 1, 16)
    with pytest.raises(ValueError, match="config must be a NoncausalConfig"):
        mhla(q, q, q, torch.rand(2, 2), block_size=16, backend="triton", config={"path": "parallel"})
