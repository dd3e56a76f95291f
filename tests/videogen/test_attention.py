"""MHLAWanAttention against a direct float64 re-statement of the authors' video MHLA."""

import math

import pytest
import torch

from mhla_videogen.attention import MHLAWanAttention, MHLAWanAttnProcessor, RotaryWithGrid
from mhla_videogen.model import MHLAWanTransformer3DModel
from tests.core.errors import rel_err

from .conftest import BLOCKS, TINY_WAN

DIM, HEADS, HEAD_DIM = 64, 2, 32


def rope_angles(grid, head_dim, theta=10000.0):
    """[N, head_dim / 2] rotation angles of original Wan's 3-axis RoPE (pairs split c - 2(c//3), c//3, c//3)."""
    c = head_dim // 2
    pairs = [c - 2 * (c // 3), c // 3, c // 3]
    axes = []
    for n_pairs, size in zip(pairs, grid):
        d = 2 * n_pairs
        freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        axes.append(torch.arange(size, dtype=torch.float64)[:, None] * freq)  # [size, n_pairs]
    f, h, w = grid
    a = torch.cat([
        axes[0][:, None, None].expand(f, h, w, -1),
        axes[1][None, :, None].expand(f, h, w, -1),
        axes[2][None, None, :].expand(f, h, w, -1),
    ], dim=-1)
    return a.reshape(f * h * w, -1)


def brute(attn, x, grid, blocks):
    """float64, token by token: the math of the issue (RMSNorm_C, relu + 1e-6, RoPE, blocks, W, g_norm, gate)."""
    P = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    B, N, _ = x.shape

    def rms(t, w, eps=1e-6):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    q = torch.relu(rms(x @ P["to_q.weight"].T + P["to_q.bias"], P["norm_q.weight"])) + 1e-6
    k = torch.relu(rms(x @ P["to_k.weight"].T + P["to_k.bias"], P["norm_k.weight"])) + 1e-6
    v = x @ P["to_v.weight"].T + P["to_v.bias"]
    q, k, v = (t.reshape(B, N, HEADS, HEAD_DIM) for t in (q, k, v))
    rot = torch.polar(torch.ones(()), rope_angles(grid, HEAD_DIM).float()).to(torch.complex128)[None, :, None]

    def rope(t):
        z = torch.complex(t[..., 0::2], t[..., 1::2]) * rot
        return torch.stack([z.real, z.imag], dim=-1).flatten(-2)

    q, k = rope(q), rope(k)
    tile = [math.ceil(g / b) for g, b in zip(grid, blocks)]
    block_of = []
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                bf, bh, bw = f // tile[0], h // tile[1], w // tile[2]
                block_of.append((bf * blocks[1] + bh) * blocks[2] + bw)
    M = math.prod(blocks)
    W = P["block_attn.conv.weight"][:, :, 0, 0]
    S = torch.zeros(B, M, HEADS, HEAD_DIM, HEAD_DIM, dtype=torch.float64)
    for t, j in enumerate(block_of):
        S[:, j] += torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
    S_mixed = torch.einsum("ij,bjhde->bihde", W, S)
    o = torch.stack([torch.einsum("bhd,bhde->bhe", q[:, t], S_mixed[:, i]) for t, i in enumerate(block_of)], dim=1)
    o = rms(o, P["g_norm.weight"]).reshape(B, N, DIM)
    if "g.weight" in P:
        o = o * torch.nn.functional.silu(x @ P["g.weight"].T + P["g.bias"])
    return o @ P["to_out.0.weight"].T + P["to_out.0.bias"]


def make_attn(gated, seed=0):
    torch.manual_seed(seed)
    attn = MHLAWanAttention(DIM, HEADS, HEAD_DIM, block_layout=BLOCKS, gated=gated)
    with torch.no_grad():  # move every norm and W off their trivial init (W gets negative entries too)
        for p in (attn.norm_q.weight, attn.norm_k.weight, attn.g_norm.weight):
            p.uniform_(0.5, 1.5)
        attn.block_attn.conv.weight.normal_()
    return attn


def wan_rotary(grid):
    model = MHLAWanTransformer3DModel(**TINY_WAN, mhla_layers="none")
    dummy = torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2])
    return model.rope(dummy)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("grid", [(4, 4, 6), (3, 5, 7)], ids=["divisible", "padded"])
def test_processor_matches_float64_brute_force(gated, grid):
    attn = make_attn(gated)
    rotary = wan_rotary(grid)
    assert isinstance(rotary, RotaryWithGrid) and rotary.grid == grid
    x = torch.randn(2, math.prod(grid), DIM)
    out = attn(x, None, None, rotary)
    ref = brute(attn, x, grid, BLOCKS)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_grid_keyword_and_clear_errors():
    attn = make_attn(False)
    grid = (2, 4, 6)
    rotary = wan_rotary(grid)
    x = torch.randn(1, math.prod(grid), DIM)
    torch.testing.assert_close(attn(x, None, None, tuple(rotary), grid=grid), attn(x, None, None, rotary))
    with pytest.raises(ValueError, match="token grid"):
        attn(x, None, None, tuple(rotary))
    with pytest.raises(ValueError, match="has 40 tokens"):
        attn(x, None, None, tuple(rotary), grid=(2, 4, 5))
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, x, None, rotary)


def test_bf16_runs_with_fp32_state():
    attn = make_attn(True).to(torch.bfloat16)
    grid = (2, 4, 6)
    x = torch.randn(1, math.prod(grid), DIM)
    out = attn(x.bfloat16(), None, None, wan_rotary(grid))
    ref = make_attn(True)(x, None, None, wan_rotary(grid))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("grid", [(4, 4, 6), (3, 5, 7)], ids=["divisible", "padded"])
def test_fast_precision_matches_float64_brute_force(grid):
    """precision="fast": fp32 RoPE and input-dtype operands; fp32 tolerance in fp32, bf16 tolerance in bf16."""
    attn = make_attn(True, seed=1)
    attn.set_processor(MHLAWanAttnProcessor(precision="fast"))
    rotary = wan_rotary(grid)
    x = torch.randn(2, math.prod(grid), DIM)
    ref = brute(attn, x, grid, BLOCKS)
    out = attn(x, None, None, rotary)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    attn16 = attn.to(torch.bfloat16)
    ref16 = brute(attn16, x.bfloat16().float(), grid, BLOCKS)  # the same rounded weights and inputs, in float64
    out16 = attn16(x.bfloat16(), None, None, rotary)
    assert out16.dtype == torch.bfloat16
    rel = rel_err(out16, ref16)
    assert rel < 2e-2, rel


def test_set_mhla_precision_and_bad_value():
    model = MHLAWanTransformer3DModel(**TINY_WAN, mhla_layers="full")
    model.set_mhla_precision("fast")
    assert all(a.processor.precision == "fast" for a in model.mhla_attentions.values())
    with pytest.raises(ValueError, match="precision must be one of"):
        model.set_mhla_precision("half")
