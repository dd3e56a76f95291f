"""BlockLayout against an explicit loop construction (docs/spec.md section 3)."""

import itertools
import math

import pytest
import torch

from mhla_core import BlockLayout, block_distance_mixing, mhla
from tests.core.brute import brute_mhla
from tests.core.errors import rel_err


def _loop_order(grid, blocks):
    """Row-major token index for each block-major slot (None for padding), by explicit loops."""
    tile = [math.ceil(g / b) for g, b in zip(grid, blocks)]
    order = []
    for blk in itertools.product(*[range(b) for b in blocks]):
        for pos in itertools.product(*[range(t) for t in tile]):
            coord = [b * t + p for b, t, p in zip(blk, tile, pos)]
            if all(c < g for c, g in zip(coord, grid)):
                idx = 0
                for c, g in zip(coord, grid):
                    idx = idx * g + c
                order.append(idx)
            else:
                order.append(None)
    return order


@pytest.mark.parametrize(
    "grid,blocks",
    [((12,), (3,)), ((8, 6), (2, 3)), ((4, 6, 10), (2, 3, 5)), ((21, 30, 50), (3, 5, 10)),
     ((14, 14), (4, 4)), ((5, 7), (2, 3)), ((3, 5, 4), (2, 2, 3)), ((10,), (4,))],
)
def test_order_matches_loops_and_round_trips(grid, blocks):
    layout = BlockLayout(grid, blocks)
    N = math.prod(grid)
    x = torch.randn(2, N, 3)
    xb = layout.to_blocks(x)
    order = _loop_order(grid, blocks)
    assert xb.shape == (2, layout.num_blocks * layout.block_size, 3) == (2, len(order), 3)
    real = [i for i, o in enumerate(order) if o is not None]
    pad = [i for i, o in enumerate(order) if o is None]
    assert torch.equal(xb[:, real], x[:, [order[i] for i in real]])
    assert not pad or xb[:, pad].abs().max() == 0
    assert torch.equal(layout.from_blocks(xb), x)
    assert layout.is_padded == bool(pad)


def test_properties_and_distances():
    layout = BlockLayout((16, 16), (4, 4))
    assert (layout.num_blocks, layout.block_size, layout.tile) == (16, 16, (4, 4))
    d = layout.distances()
    assert d.shape == (16, 16)
    assert torch.allclose(d[0, 1], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(d[0, 15], torch.tensor(math.sqrt(18), dtype=torch.float64))
    assert torch.allclose(d, d.t()) and torch.all(d.diagonal() == 0)


@pytest.mark.parametrize("normalize,normalizer", [(True, "exact"), (True, "reference"), (False, "exact")])
@pytest.mark.parametrize("grid,blocks", [((5, 7), (2, 3)), ((7,), (3,)), ((3, 4, 5), (2, 2, 2))])
def test_padded_grid_equals_smaller_edge_blocks(grid, blocks, normalize, normalizer):
    layout = BlockLayout(grid, blocks)
    assert layout.is_padded
    N, H = math.prod(grid), 2
    q, k = torch.rand(2, 1, N, H, 3, dtype=torch.float64)
    v = torch.randn(1, N, H, 4, dtype=torch.float64)
    W = block_distance_mixing(layout, "cos").double() + 0.1 * torch.rand(layout.num_blocks, layout.num_blocks,
                                                                          dtype=torch.float64)
    out = mhla(layout.to_blocks(q), layout.to_blocks(k), layout.to_blocks(v), W, block_size=layout.block_size,
               normalize=normalize, normalizer=normalizer, backend="torch")
    out = layout.from_blocks(out)
    ref = brute_mhla(q, k, v, W, grid, blocks, normalize, normalizer)
    assert rel_err(out, ref) < 1e-9
