"""Mixing initialisers against the table of docs/spec.md section 4, computed here from first principles."""

import math

import pytest
import torch

from mhla_core import BlockLayout, block_distance_mixing, causal_mixing_init


def _centre_distance(a, b, blocks):
    ca = [(a // math.prod(blocks[i + 1 :])) % blocks[i] + 0.5 for i in range(len(blocks))]
    cb = [(b // math.prod(blocks[i + 1 :])) % blocks[i] + 0.5 for i in range(len(blocks))]
    return math.dist(ca, cb)


def _table(blocks, transform, local_thres=1.5, exp_sigma=3.0):
    M = math.prod(blocks)
    D = [[_centre_distance(i, j, blocks) for j in range(M)] for i in range(M)]
    dmax = max(max(r) for r in D)
    f = {
        "linear": lambda d: 1 - d / dmax,
        "cos": lambda d: math.cos(d / dmax * math.pi / 4),
        "exp": lambda d: math.exp(-d / exp_sigma),
        "gaussian": lambda d: math.exp(-(d**2) / (2 * (dmax / 3) ** 2)),
        "local": lambda d: float(d <= local_thres),
    }[transform]
    W = [[f(D[i][j]) for j in range(M)] for i in range(M)]
    if transform != "gaussian":
        for j in range(M):
            col = sum(W[i][j] for i in range(M))
            for i in range(M):
                W[i][j] /= col
    return torch.tensor(W, dtype=torch.float64)


@pytest.mark.parametrize("transform", ["linear", "cos", "exp", "gaussian", "local"])
@pytest.mark.parametrize("blocks", [(4, 4), (6,), (2, 3, 4)])
def test_transforms_match_table(transform, blocks):
    W = block_distance_mixing(BlockLayout(blocks, blocks), transform)
    assert W.dtype == torch.float32
    assert torch.allclose(W.double(), _table(blocks, transform), atol=1e-6)
    if transform != "gaussian":
        assert torch.allclose(W.sum(0), torch.ones(W.shape[0]), atol=1e-6)


def test_options_change_the_matrix():
    layout = BlockLayout((6, 6), (3, 3))
    assert torch.allclose(block_distance_mixing(layout, "exp", exp_sigma=1.0).double(),
                          _table((3, 3), "exp", exp_sigma=1.0), atol=1e-6)
    assert torch.allclose(block_distance_mixing(layout, "local", local_thres=1.0).double(),
                          _table((3, 3), "local", local_thres=1.0), atol=1e-6)


@pytest.mark.parametrize("transform", ["linear", "cos", "exp", "gaussian", "local"])
def test_single_block_is_identity(transform):
    W = block_distance_mixing(BlockLayout((16,), (1,)), transform)
    assert torch.equal(W, torch.ones(1, 1)) and torch.isfinite(W).all()


def test_causal_init():
    W = causal_mixing_init(5)
    for i in range(5):
        for j in range(5):
            assert W[i, j].item() == pytest.approx(1 / (i + 1) if j <= i else 0.0)
