"""Grid-order inputs (`mhla(..., layout=)`): the kernels address the row-major grid themselves.

`BlockLayout.to_blocks` / `from_blocks` around the float64 PyTorch reference is the reference of
that addressing. On CPU the kernels run in the Triton interpreter.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from mhla_core import BlockLayout, NoncausalConfig, mhla  # noqa: E402
from mhla_core.ops.noncausal import parallel as P  # noqa: E402
from mhla_core.ops.noncausal.state_config import default_state_config  # noqa: E402
from tests.core.errors import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMS = [(True, "exact"), (True, "reference"), (False, "exact")]
# (grid, blocks): padded 1D, padded 2D, divided 2D, padded 3D
LAYOUTS = [((30,), (4,)), ((5, 7), (2, 3)), ((8, 8), (2, 2)), ((3, 4, 5), (2, 2, 2))]


def _config(path: str) -> NoncausalConfig:
    """The parallel path with small tiles, or the state path's "state" / "direct" variant."""
    if path == "parallel":
        return NoncausalConfig(path="parallel", parallel=P.ParallelTiles(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1))
    return NoncausalConfig(path="state", state=replace(default_state_config(), variant=path))


def _errors(layout: BlockLayout, cfg, normalize, normalizer, per_head=False, bhnd=False, H=2, Dk=16, Dv=16,
            seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, N, M = 2, layout.num_tokens, layout.num_blocks
    q, k = (torch.rand(B, N, H, Dk, generator=g) for _ in range(2))
    v, do = (torch.randn(B, N, H, Dv, generator=g) for _ in range(2))
    w = torch.rand(*((H, M, M) if per_head else (M, M)), generator=g)
    kw = dict(normalize=normalize, normalizer=normalizer)
    outs = []
    for backend in ("triton", "reference"):
        dt = dtype if backend == "triton" else torch.float64
        xs = [t.to(DEVICE, dt) for t in (q, k, v)]
        if bhnd and backend == "triton":  # [B, H, N, D] storage viewed as [B, N, H, D]
            xs = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in xs]
        wl = w.to(DEVICE, torch.float32 if backend == "triton" else torch.float64).requires_grad_()
        leaves = [t.requires_grad_() for t in xs] + [wl]
        if backend == "triton":
            o = mhla(*leaves, layout=layout, backend="triton", config=cfg, **kw)
        else:  # the reference addressing: permute to block-major order and back
            qb, kb, vb = (layout.to_blocks(t) for t in leaves[:3])
            o = layout.from_blocks(mhla(qb, kb, vb, wl, block_size=layout.block_size, backend="torch", **kw))
        assert o.shape == (B, N, H, Dv)
        outs.append([o, *torch.autograd.grad(o, leaves, do.to(DEVICE, o.dtype))])
    errs = [rel_err(a, b) for a, b in zip(*outs)]
    assert all(e == e for e in errs), errs  # no NaN
    return errs


@pytest.mark.parametrize("normalize,normalizer", NORMS)
@pytest.mark.parametrize("grid,blocks", LAYOUTS)
@pytest.mark.parametrize("path", ["parallel", "state", "direct"])
def test_grid_order_matches_block_layout(path, grid, blocks, normalize, normalizer):
    layout = BlockLayout(grid, blocks)
    errs = _errors(layout, _config(path), normalize, normalizer)
    assert max(errs) < 1e-4, errs


@pytest.mark.parametrize("path", ["parallel", "state"])
def test_grid_order_per_head_bhnd_bf16(path):
    layout = BlockLayout((5, 7), (2, 3))
    errs = _errors(layout, _config(path), True, "reference", per_head=True, bhnd=True, Dk=24, Dv=20,
                   dtype=torch.bfloat16)
    assert max(errs) < 2e-2, errs


def test_gather_or_permute_choice():
    """Measured rule: the parallel kernels with padded head dims get block-order copies, all else gathers."""
    from mhla_core.ops.noncausal.plan import gather_in_kernel

    cfg = NoncausalConfig()
    assert not gather_in_kernel(32, 16, 256, 16, 72, 72, 2, cfg)  # DiT-XL/2 256: parallel, 72 padded to 128
    assert gather_in_kernel(128, 3, 256, 16, 64, 64, 2, cfg)  # DeiT-T
    assert gather_in_kernel(16, 16, 1024, 16, 72, 72, 2, cfg)  # DiT-XL/2 512: state path
    assert gather_in_kernel(32, 16, 256, 16, 72, 72, 2, NoncausalConfig(path="state"))


def test_token_index_is_the_block_layout():
    layout = BlockLayout((5, 7), (2, 3))  # tiles 3 x 3, padded to 6 x 9
    idx = layout.token_index()
    assert idx.dtype == torch.int32 and idx.numel() == layout.num_blocks * layout.block_size
    x = torch.arange(35.0).view(1, 35, 1) + 1
    ref = layout.to_blocks(x).view(-1) - 1  # padding -> -1
    assert torch.equal(idx.long(), ref.long())
    assert (idx < 0).sum() == 6 * 9 - 35
    assert layout.token_index() is idx  # cached
    assert BlockLayout((64,), (4,)).is_block_major and not layout.is_block_major
    assert not BlockLayout((8, 8), (2, 2)).is_block_major


def test_block_major_layout_takes_the_plain_path():
    """An undivided 1D grid is already block-major: layout= equals block_size= exactly."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.rand(1, 32, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    w = torch.rand(4, 4, generator=g).to(DEVICE)
    a = mhla(q, k, v, w, layout=BlockLayout((32,), (4,)), backend="triton")
    b = mhla(q, k, v, w, block_size=8, backend="triton")
    assert torch.equal(a, b)


def test_layout_errors():
    q = torch.rand(1, 35, 2, 16)
    w = torch.rand(6, 6)
    layout = BlockLayout((5, 7), (2, 3))
    with pytest.raises(ValueError, match="block_size= .* or layout="):
        mhla(q, q, q, w)
    with pytest.raises(ValueError, match="holds 35"):
        mhla(q[:, :30], q[:, :30], q[:, :30], w, layout=layout)
    with pytest.raises(ValueError, match="disagrees"):
        mhla(q, q, q, w, layout=layout, block_size=4)
    with pytest.raises(ValueError, match="BlockLayout"):
        mhla(q, q, q, w, layout=(5, 7))
    with pytest.raises(ValueError):
        mhla(q, q, q, torch.rand(4, 4), layout=layout)  # 6 blocks, not 4


def test_is_block_major_agrees_with_the_token_index():
    """The arithmetic shortcut against the index itself, over every block count of a few grids."""
    import itertools

    for grid in [(12,), (6, 8), (1, 8), (8, 1), (2, 2, 6)]:
        for blocks in itertools.product(*[range(1, g + 1) for g in grid]):
            layout = BlockLayout(grid, blocks)
            idx = layout.token_index()
            same = not layout.is_padded and torch.equal(idx, torch.arange(layout.num_tokens, dtype=torch.int32))
            assert layout.is_block_major == same, (grid, blocks)
