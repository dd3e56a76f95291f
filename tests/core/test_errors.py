"""Malformed inputs raise ValueError naming the shapes (docs/spec.md section 5)."""

import pytest
import torch

from mhla_core import (
    MHLA,
    BlockLayout,
    block_distance_mixing,
    causal_mixing_init,
    chunk_mhla,
    fused_recurrent_mhla,
    mhla,
)
from mhla_core.ops.causal import MHLAState


def _qkv(B=1, N=12, H=2, Dk=4, Dv=4):
    return torch.rand(B, N, H, Dk), torch.rand(B, N, H, Dk), torch.randn(B, N, H, Dv)


def test_block_size_not_dividing_n_names_nearest():
    q, k, v = _qkv(N=12)
    with pytest.raises(ValueError, match=r"N = 12.*block_size = 5.*nearest valid block_size: \[4, 6\]"):
        mhla(q, k, v, torch.ones(2, 2), block_size=5)


def test_qk_head_dims_differ():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q \(1, 12, 2, 4\) and k \(1, 12, 2, 3\)"):
        mhla(q, k[..., :3], v, torch.ones(3, 3), block_size=4)


def test_v_tokens_differ():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="v must share"):
        mhla(q, k, v[:, :8], torch.ones(3, 3), block_size=4)


@pytest.mark.parametrize("shape", [(4, 4), (3, 3, 3), (2, 4, 4), (3,)])
def test_mixing_wrong_size(shape):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"mixing must be \[3, 3\] or \[2, 3, 3\].*got"):
        mhla(q, k, v, torch.ones(*shape), block_size=4)


def test_bad_normalizer_and_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="normalizer"):
        mhla(q, k, v, torch.ones(3, 3), block_size=4, normalizer="approx")
    with pytest.raises(ValueError, match="backend"):
        mhla(q, k, v, torch.ones(3, 3), block_size=4, backend="cuda")


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be \[B, N, H, D\]"):
        mhla(q[0], k, v, torch.ones(3, 3), block_size=4)


def test_too_many_causal_chunks():
    q, k, v = _qkv(N=40)
    with pytest.raises(ValueError, match=r"40 tokens needs 5 chunks of 8.*4 x 4.*causal_mixing_init\(5\)"):
        chunk_mhla(q, k, v, torch.ones(4, 4), chunk_size=8)
    with pytest.raises(ValueError, match="needs 5 chunks"):
        fused_recurrent_mhla(q, k, v, torch.ones(4, 4), chunk_size=8)


def test_causal_state_and_packing_errors():
    q, k, v = _qkv(N=10)
    W = torch.ones(4, 4)
    _, st = chunk_mhla(q, k, v, W, chunk_size=4, output_final_state=True)
    with pytest.raises(ValueError, match="chunk_size=4, got chunk_size=8"):
        chunk_mhla(q, k, v, W, chunk_size=8, initial_state=st)
    with pytest.raises(ValueError, match="needs 5 chunks"):  # 10 carried + 10 new tokens > 16
        chunk_mhla(q, k, v, W, chunk_size=4, initial_state=st)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_mhla(q, k, v, W, chunk_size=4, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="packed"):
        chunk_mhla(*_qkv(B=2, N=10), W, chunk_size=4, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"mixing must be \[L, L\]"):
        chunk_mhla(q, k, v, torch.ones(4, 3), chunk_size=4)


def test_grid_mismatch():
    with pytest.raises(ValueError, match=r"to_blocks expects \[B, 20, \.\.\.\]"):
        BlockLayout((4, 5), (2, 1)).to_blocks(torch.randn(1, 21, 3))
    with pytest.raises(ValueError, match="cannot exceed"):
        BlockLayout((4, 5), (5, 1))
    layer = MHLA(16, 2, blocks=(2, 2))
    with pytest.raises(ValueError, match=r"x is \(1, 20, 16\), expected \[B, 16, 16\] for grid \(4, 4\)"):
        layer(torch.randn(1, 20, 16), grid=(4, 4))
    with pytest.raises(ValueError, match="3 axes"):
        layer(torch.randn(1, 8, 16), grid=(2, 2, 2))


def test_auto_backend_choice():
    from mhla_core.ops.utils import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, True, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, True, torch.float64) == "torch"  # the kernels take no fp64
    assert resolve_backend("auto", cpu, True, torch.float32) == "torch"
    assert resolve_backend("auto", cuda, False, torch.float32) == "torch"
    with pytest.raises(NotImplementedError, match="no kernel"):
        resolve_backend("triton", cpu, False)


def _three(B=1, N=16, H=2, D=8):
    return [torch.rand(B, N, H, D) for _ in range(3)]


@pytest.mark.parametrize("call,names", [
    # inputs that are not tensors, or hold no head dim, or no data
    (lambda: mhla(*[x.numpy() for x in _three()], torch.rand(4, 4), block_size=4), "q"),
    (lambda: mhla(*_three(D=0), torch.rand(4, 4), block_size=4), "head dim"),
    (lambda: mhla(*_three(), torch.rand(4, 4, device="meta"), block_size=4), "mixing"),
    (lambda: mhla(*[x.to("meta") for x in _three()], torch.rand(4, 4, device="meta"), block_size=4), "meta"),
    (lambda: mhla(*_three(), [[1.0] * 4] * 4, block_size=4), "mixing"),
    (lambda: chunk_mhla(*_three(), torch.rand(1, 1, device="meta"), chunk_size=16), "mixing"),
    (lambda: fused_recurrent_mhla(*_three(B=0), causal_mixing_init(1), chunk_size=16), "B = 0"),
    # a continuation state that cannot continue
    (lambda: chunk_mhla(*_three(), causal_mixing_init(1), chunk_size=16,
                        initial_state=MHLAState(torch.zeros(1, 2, 1, 8, 8), torch.zeros(1, 2, 8, 8), (-3,), 16)),
     "offsets"),
    (lambda: chunk_mhla(*_three(), causal_mixing_init(1), chunk_size=16,
                        initial_state=MHLAState(torch.zeros(1, 2, 1, 8, 8, device="meta"),
                                                torch.zeros(1, 2, 8, 8, device="meta"), (0,), 16)),
     "initial_state"),
    # layer and initialiser settings
    (lambda: MHLA(16, 2, block_tokens=2), "block_tokens"),
    (lambda: MHLA(16, 2, grid=(8, 8), blocks=(2, 2), lepe_kernel=4), "lepe_kernel"),
    (lambda: block_distance_mixing(BlockLayout((4, 4), (2, 2)), "local", local_thres=-1), "local_thres"),
    (lambda: block_distance_mixing(BlockLayout((4, 4), (2, 2)), "exp", exp_sigma=0), "exp_sigma"),
])
def test_unclear_inputs_get_named_value_errors(call, names):
    """Each input raises ValueError (not AttributeError, TypeError, IndexError, NaN output) naming its argument."""
    with pytest.raises(ValueError, match=names):
        call()
