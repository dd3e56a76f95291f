"""Triton non-causal MHLA against the PyTorch reference (on CPU the kernels run in the interpreter)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from mhla_core.layout import BlockLayout  # noqa: E402
from mhla_core.ops.noncausal import chunk as K  # noqa: E402
from mhla_core.ops.noncausal import (
    mhla,  # noqa: E402
    triton_ops,  # noqa: E402
)
from mhla_core.ops.noncausal.launch import launch  # noqa: E402
from mhla_core.ops.noncausal.plan import NoncausalConfig  # noqa: E402
from mhla_core.ops.noncausal.state_config import (  # noqa: E402
    DwLaunch,
    MixLaunch,
    MixStationaryLaunch,
    StateConfig,
    TokenLaunch,
    default_state_config,
)
from tests.core.errors import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
VARIANTS = [(True, "exact"), (True, "reference"), (False, "exact")]


def _config(path, **state):
    """The config that forces `path`: "parallel", or "state" / "direct" (the state kernels' variants);
    `state`: StateConfig fields to change from the defaults."""
    if path == "parallel":
        return NoncausalConfig(path="parallel")
    return NoncausalConfig(path="state", state=replace(default_state_config(), variant=path, **state))


def _inputs(B, H, M, L, Dk, Dv, per_head, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = M * L
    q = torch.rand(B, N, H, Dk, generator=g)
    k = torch.rand(B, N, H, Dk, generator=g)
    v = torch.randn(B, N, H, Dv, generator=g)
    w = torch.rand(*((H, M, M) if per_head else (M, M)), generator=g)
    do = torch.randn(B, N, H, Dv, generator=g)
    return q, k, v, w, do


def _compare(B, H, M, L, Dk, Dv, per_head, normalize, normalizer, dtype=torch.float32, scale=None,
             config=None, transposed=False):
    """Max relative error of o, dq, dk, dv, dW: triton in `dtype` vs the reference on the same inputs.

    transposed: the Triton inputs are [B, N, H, D] views of [B, H, N, D] tensors.
    """
    q, k, v, w, do = _inputs(B, H, M, L, Dk, Dv, per_head)
    kw = dict(block_size=L, normalize=normalize, normalizer=normalizer, scale=scale)
    results = []
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        leaves = [t.to(DEVICE, dt) for t in (q, k, v)]
        if transposed and backend == "triton":
            leaves = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves]
        leaves = [t.requires_grad_() for t in leaves]
        leaves.append(w.to(DEVICE, torch.float32 if backend == "triton" else dt).requires_grad_())
        out = mhla(*leaves, backend=backend, config=config if backend == "triton" else None, **kw)
        if backend == "triton":
            assert out.dtype == dtype and out.shape == (B, M * L, H, Dv)
        grads = torch.autograd.grad(out, leaves, do.to(DEVICE, out.dtype))
        results.append([out, *grads])
    errs = [rel_err(a, b) for a, b in zip(*results)]
    assert all(e == e for e in errs), errs
    return max(errs), errs


@pytest.mark.parametrize("path", ["state", "direct", "parallel"])
@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
@pytest.mark.parametrize("per_head", [False, True])
def test_fp32_matches_reference(path, normalize, normalizer, per_head):
    cfg = _config(path)
    shape = (2, 2, 5, 6, 16, 32) if per_head else (1, 2, 4, 10, 32, 16)  # Dk != Dv both ways
    err, errs = _compare(*shape, per_head, normalize, normalizer, config=cfg)
    assert err < TOL[torch.float32], errs


@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
def test_single_block_is_linear_attention(normalize, normalizer):
    _, errs = _compare(2, 2, 1, 12, 16, 16, False, normalize, normalizer, scale=0.7)
    # with one block a normalised output does not depend on W (dW ~ eps): skip its relative error
    checked = errs[:4] if normalize else errs
    assert max(checked) < TOL[torch.float32], errs


@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
def test_several_dv_tiles_and_row_tiles(normalize, normalizer):
    """Dv split over programs (program 0 does dq, dk), mixing with several row tiles, split dW."""
    base = default_state_config()
    cfg = _config("state", max_block_dv=16, max_block_dv_fp32=16,
                  mix_kernel=replace(base.mix_kernel, block_i=16, block_i_large=16),
                  dw_kernel=replace(base.dw_kernel, block_i=16, block_c=64, min_programs=64))
    q = torch.empty(1, 17 * 3, 1, 24)
    plan = K.make_plan(q, torch.empty(1, 17 * 3, 1, 40), 3, 17, triton_ops._norm_mode(normalize, normalizer),
                       cfg.state)
    assert plan.n_dv == 3 and not plan.direct
    err, errs = _compare(1, 1, 17, 3, 24, 40, True, normalize, normalizer, config=cfg)
    assert err < TOL[torch.float32], errs


HALF_CASES = [(torch.bfloat16, "exact"), (torch.bfloat16, "reference"), (torch.float16, "exact")]


@pytest.mark.parametrize("path", ["state", "direct", "parallel"])
@pytest.mark.parametrize("dtype,normalizer", HALF_CASES)
def test_half_precision(dtype, path, normalizer):
    cfg = _config(path)
    err, errs = _compare(2, 2, 5, 6, 16, 32, path != "direct", True, normalizer, dtype=dtype, config=cfg)
    assert err < TOL[dtype], errs


def test_strided_views_and_frozen_mixing():
    """q, k, v as views of one packed tensor (no copies), and no gradient for the mixing matrix."""
    B, H, M, L, D = 2, 2, 4, 6, 16
    q, k, v, w, do = _inputs(B, H, M, L, D, D, False, seed=1)
    packed = torch.stack([q, k, v], dim=2).to(DEVICE).requires_grad_()  # [B, N, 3, H, D]
    qv, kv, vv = packed.unbind(dim=2)
    assert not qv.is_contiguous()
    out = mhla(qv, kv, vv, w.to(DEVICE), block_size=L, backend="triton")
    (grad,) = torch.autograd.grad(out, packed, do.to(DEVICE))
    ref_in = torch.stack([q, k, v], dim=2).double().requires_grad_()
    ref = mhla(*ref_in.unbind(dim=2), w.double(), block_size=L, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref, ref_in, do.double())
    assert rel_err(out.cpu(), ref) < 1e-4 and rel_err(grad.cpu(), ref_grad) < 1e-4


def test_state_variant_choice():
    cfg = StateConfig()  # the GPU defaults
    q = torch.empty(1, 256, 6, 64)
    assert K.make_plan(q, q, 16, 16, K.NORM_EXACT, cfg).direct  # DiT-S: 16 blocks of 16 tokens
    assert not K.make_plan(q, q, 16, 16, K.NORM_EXACT, replace(cfg, variant="state")).direct
    q = torch.empty(1, 31500, 1, 128)
    assert not K.make_plan(q, q, 210, 150, K.NORM_EXACT, cfg).direct  # Wan: 150 blocks of 210 tokens
    q = torch.empty(1, 256, 1, 16)
    assert K.make_plan(q, q, 128, 2, K.NORM_EXACT, replace(cfg, variant="direct")).direct  # beyond direct_max_l
    assert not K.make_plan(q, q, 128, 2, K.NORM_EXACT, cfg).direct


@pytest.mark.parametrize("bad,field", [
    (lambda: StateConfig(variant="fast"), "variant"),
    (lambda: StateConfig(mix_impl="cublas"), "mix_impl"),
    (lambda: StateConfig(mix_matmul_m_multiple=-1), "mix_matmul_m_multiple"),
    (lambda: StateConfig(mix_matmul_min_rows=1.5), "mix_matmul_min_rows"),
    (lambda: StateConfig(mix_prec_half="fp16"), "mix_prec_half"),
    (lambda: StateConfig(max_block_dv=96), "max_block_dv"),
    (lambda: StateConfig(fp32_block_t=8), "fp32_block_t"),
    (lambda: StateConfig(direct_max_m=0), "direct_max_m"),
    (lambda: StateConfig(cost_bw=-1.0), "cost_bw"),
    (lambda: StateConfig(bwd_tf32_half=True), "bwd_tf32_half"),
    (lambda: StateConfig(state_dtype="float16"), "state_dtype"),
    (lambda: StateConfig(mix_kernel={"block_i": 64}), "mix_kernel"),
    (lambda: TokenLaunch(block_t=48), "block_t"),
    (lambda: TokenLaunch(num_warps=3), "num_warps"),
    (lambda: MixLaunch(block_c=100), "block_c"),
    (lambda: DwLaunch(min_programs=0), "min_programs"),
    (lambda: DwLaunch(num_stages=0), "num_stages"),
    (lambda: NoncausalConfig(state="direct"), "state"),
])
def test_state_config_validation(bad, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        bad()


def test_state_config_keys_the_plan_cache():
    """Configs differing only in a launch setting give different plans; equal configs share one."""
    base = replace(default_state_config(), variant="state", state_kernel=TokenLaunch(16, 4, 1))
    assert hash(base) == hash(replace(base)) and NoncausalConfig().state == default_state_config()
    q = torch.empty(1, 5 * 64, 2, 16, dtype=torch.bfloat16)
    plan = K.make_plan(q, q, 64, 5, K.NORM_EXACT, base)
    assert K.make_plan(q, q, 64, 5, K.NORM_EXACT, replace(base)) is plan  # an equal config: the cached plan
    warps = replace(base, out_kernel=replace(base.out_kernel, num_warps=2 * base.out_kernel.num_warps))
    tile = replace(base, state_kernel=TokenLaunch(32, 4, 1))
    for cfg in (warps, tile):
        assert cfg != base
        other = K.make_plan(q, q, 64, 5, K.NORM_EXACT, cfg)
        assert other is not plan and other.config is cfg
        assert K.make_plan(q, q, 64, 5, K.NORM_EXACT, cfg) is other
    more_warps = K.make_plan(q, q, 64, 5, K.NORM_EXACT, warps).launch("out")["num_warps"]
    assert more_warps == 2 * plan.launch("out")["num_warps"]
    assert K.make_plan(q, q, 64, 5, K.NORM_EXACT, tile).token_block("state") == 2 * plan.token_block("state")
    with pytest.raises(ValueError, match="StateConfig"):
        K.make_plan(q, q, 64, 5, K.NORM_EXACT, None)


def test_float64_raises():
    q, k, v, w, _ = _inputs(1, 1, 2, 4, 16, 16, False)
    with pytest.raises(ValueError, match="float64"):
        mhla(q.double(), k.double(), v.double(), w, block_size=4, backend="triton")


def _op_args(normalize=True, normalizer="exact", per_head=False):
    q, k, v, w, do = _inputs(1, 2, 3, 4, 16, 16, per_head, seed=2)
    q, k, v, w, do = (t.to(DEVICE) for t in (q, k, v, w, do))
    return q, k, v, w, do, (4, normalize, normalizer, 1e-6, 0.25, "auto")


def _grid_op_args(normalizer="exact"):
    """Inputs in row-major order of a 3 x 3 grid with 2 x 2 blocks (tiles 2 x 2, padded to 4 x 4)."""
    layout = BlockLayout((3, 3), (2, 2))
    g = torch.Generator().manual_seed(3)
    q, k = (torch.rand(1, 9, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    v, do = (torch.randn(1, 9, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    w = torch.rand(4, 4, generator=g).to(DEVICE)
    return q, k, v, w, do, layout, (layout.token_index(DEVICE), 4, True, normalizer, 1e-6, 0.25, "auto")


def test_custom_op_autograd_matches_eager():
    q, k, v, w, do, cfg = _op_args(normalizer="reference", per_head=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = torch.ops.mhla.noncausal_fwd(*leaves, None, *cfg)[0]
    grads = torch.autograd.grad(out, leaves, do)
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out2 = triton_ops.mhla_triton(*leaves2, *cfg[:-1])
    grads2 = torch.autograd.grad(out2, leaves2, do)
    for a, b in zip([out, *grads], [out2, *grads2]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # inference path, without the autograd function
        torch.testing.assert_close(triton_ops.mhla_triton(q, k, v, w, *cfg[:-1]), out2.detach())


@pytest.mark.parametrize("normalize,normalizer", [(True, "exact"), (True, "reference")])
def test_opcheck(normalize, normalizer):
    q, k, v, w, do, cfg = _op_args(normalize, normalizer)
    leaves = [t.requires_grad_() for t in (q, k, v, w)]
    torch.library.opcheck(torch.ops.mhla.noncausal_fwd.default, (*leaves, None, *cfg))
    o, r = (t.detach() for t in torch.ops.mhla.noncausal_fwd(*leaves, None, *cfg))
    plain = [t.detach() for t in (do, q, k, v, w)]
    torch.library.opcheck(torch.ops.mhla.noncausal_bwd.default, (*plain, None, o, r, *cfg[:-1], True, cfg[-1]))


@pytest.mark.parametrize("normalizer", ["exact", "reference"])
def test_opcheck_grid_layout(normalizer):
    q, k, v, w, do, _, args = _grid_op_args(normalizer)
    leaves = [t.requires_grad_() for t in (q, k, v, w)]
    torch.library.opcheck(torch.ops.mhla.noncausal_fwd.default, (*leaves, *args))
    o, r = (t.detach() for t in torch.ops.mhla.noncausal_fwd(*leaves, *args))
    assert r.shape == (2, 16)  # B * H rows of M L = 16 block-major positions (7 of them padding)
    plain = [t.detach() for t in (do, q, k, v, w)]
    torch.library.opcheck(torch.ops.mhla.noncausal_bwd.default,
                          (*plain, args[0], o, r, *args[1:-1], True, args[-1]))


def test_torch_compile_fullgraph_grid_layout():
    """layout= under torch.compile: the token index enters the graph, no graph break."""
    q, k, v, w, _, _, _ = _grid_op_args("reference")
    layout = BlockLayout((3, 3), (2, 2))  # fresh: its device index is first built while tracing

    def f(q, k, v, w):
        return mhla(q, k, v, w, layout=layout, normalizer="reference", backend="triton").sum(dim=-1)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v, w)]
    blocks = [layout.to_blocks(t) for t in ref_leaves[:3]]
    ref = layout.from_blocks(mhla(*blocks, ref_leaves[3], block_size=4, normalizer="reference",
                                  backend="torch")).sum(dim=-1)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    """No graph break at the op; on CPU (interpreter) with aot_eager, on CUDA with inductor."""
    q, k, v, w, do, _ = _op_args(per_head=True)
    proj = torch.randn(16, 16, device=DEVICE)

    def f(q, k, v, w):
        o = mhla(torch.relu(q @ proj), k, v, w, block_size=4, backend="triton")
        return (o * 2).sum(dim=-1)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref = f(*leaves2)
    ref_grads = torch.autograd.grad(ref.sum(), leaves2)
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_launch_falls_back_on_shared_memory_overflow():
    """A launch that needs too much shared memory is retried with a smaller token tile, then one stage."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class FakeKernel:
        fn = test_launch_falls_back_on_shared_memory_overflow

        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append((kw["BLOCK_T"], kw["num_stages"]))
                if kw["BLOCK_T"] > 16 or kw["num_stages"] > 1:
                    raise OutOfResources(300_000, 232_448, "shared memory")

            return run

    launch(FakeKernel(), (1,), (), {"BLOCK_T": 64, "NORM": 1}, {"num_warps": 8, "num_stages": 3})
    assert calls == [(64, 3), (32, 3), (16, 3), (16, 1)]
    calls.clear()
    launch(FakeKernel(), (1,), (), {"BLOCK_T": 64, "NORM": 1}, {"num_warps": 8, "num_stages": 3})
    assert calls == [(16, 1)]  # the working setting is remembered


@pytest.mark.parametrize("path", ["state", "direct", "parallel"])
def test_fp16_state_beyond_fp16_range(path):
    """fp16 inputs whose mixed state exceeds 65504 (the output does not): no overflow."""
    cfg = _config(path)
    B, H, M, L, D = 1, 2, 2, 12, 16
    q, k, _, _, do = _inputs(B, H, M, L, D, D, False, seed=3)
    v = 3000.0 + 100.0 * torch.randn(B, M * L, H, D)
    w = torch.full((M, M), 2.0)
    out = mhla(*(t.to(DEVICE, torch.float16) for t in (q, k, v)), w.to(DEVICE), block_size=L, backend="triton",
               config=cfg)
    ref = mhla(q.double(), k.double(), v.double(), w.double(), block_size=L, backend="torch")
    assert torch.isfinite(out).all() and rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("mix_impl,mix_prec", [("matmul", "tf32"), ("matmul", "bf16"), ("triton", "bf16"),
                                               ("stationary", "tf32"), ("stationary", "bf16"), ("auto", "tf32")])
@pytest.mark.parametrize("per_head", [False, True])
def test_mixing_implementations(mix_impl, mix_prec, per_head):
    """The cuBLAS and weight-stationary mixing and bf16 mixing operands still match the reference."""
    cfg = _config("state", mix_impl=mix_impl, mix_prec_half=mix_prec)
    err, errs = _compare(2, 2, 5, 6, 16, 16, per_head, True, "reference", dtype=torch.bfloat16, config=cfg)
    assert err < TOL[torch.bfloat16], errs


@pytest.mark.parametrize("variant", ["state", "direct"])
@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_states(variant, normalize, normalizer, dtype):
    """State rows stored in bf16 (StateConfig.state_dtype): o and all four gradients within the half tolerance."""
    cfg = _config(variant, state_dtype="bfloat16")
    err, errs = _compare(2, 2, 5, 6, 16, 16, False, normalize, normalizer, dtype=dtype, config=cfg)
    assert err < TOL[dtype], errs


def test_bf16_states_several_dv_tiles_and_row_tiles():
    """bf16 states with two Dv tiles (not in place) and M above the mixing kernel's one-tile limit."""
    cfg = _config("state", state_dtype="bfloat16", max_block_dv=16,
                  mix_kernel=MixLaunch(block_i=16, block_i_large=16, block_j=16, block_c=64, num_warps=4,
                                       num_stages=1))
    err, errs = _compare(1, 2, 20, 4, 16, 32, True, True, "reference", dtype=torch.bfloat16, config=cfg)
    assert err < TOL[torch.bfloat16], errs


def test_bf16_states_buffer_dtype():
    """The plan stores bf16 states for half inputs only; fp32 inputs keep fp32 states."""
    cfg = replace(default_state_config(), state_dtype="bfloat16")
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
                        (torch.float32, torch.float32)):
        q = torch.empty(1, 4 * 16, 2, 16, dtype=dtype)
        plan = K.make_plan(q, q, 16, 4, K.NORM_EXACT, cfg)
        assert plan.xdt == want and not plan.mix_bf16


@pytest.mark.parametrize("block_i", [16, 64])  # several i tiles out of place / one tile in place
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
def test_stationary_mixing(block_i, state_dtype, normalize, normalizer):
    """The weight-stationary mixing kernel with M = 20 blocks over one or two i tiles and several column
    groups, fp32 and bf16 states, per-head W."""
    ws = MixStationaryLaunch(block_i=block_i, block_c=64, num_warps=4, num_stages=1, min_programs=8)
    cfg = _config("state", mix_impl="stationary", state_dtype=state_dtype, mix_ws_kernel=ws,
                  mix_ws_kernel_fp32=ws)
    err, errs = _compare(1, 2, 20, 4, 16, 16, True, normalize, normalizer, dtype=torch.bfloat16, config=cfg)
    assert err < TOL[torch.bfloat16], errs


@pytest.mark.parametrize("bwd_tf32_half", ["always", "never"])
@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
def test_backward_operand_precision(bwd_tf32_half, normalize, normalizer):
    """Both operand precisions of the backward's S~ products match the reference (the default "exact"
    is covered by every other half-precision test)."""
    cfg = _config("state", bwd_tf32_half=bwd_tf32_half)
    err, errs = _compare(2, 2, 5, 6, 16, 16, False, normalize, normalizer, dtype=torch.bfloat16, config=cfg)
    assert err < TOL[torch.bfloat16], errs


def test_backward_operand_precision_follows_normaliser():
    """tf32 operands for the exact normaliser only (default), always for fp16 inputs."""
    cfg = default_state_config()
    for dtype, norm, hp in ((torch.bfloat16, K.NORM_EXACT, True), (torch.bfloat16, K.NORM_REFERENCE, False),
                            (torch.bfloat16, K.NORM_NONE, False), (torch.float16, K.NORM_NONE, True)):
        q = torch.empty(1, 4 * 16, 2, 16, dtype=dtype)
        assert K.make_plan(q, q, 16, 4, norm, cfg).hp == hp


def test_auto_mixing_takes_cublas_on_cuda_for_multiples_of_64():
    """mix_impl "auto": cuBLAS for CUDA states when M is a multiple of mix_matmul_m_multiple and B H M reaches
    mix_matmul_min_rows, never on the CPU or with 0 (a stand-in with is_cuda set runs the rule)."""
    from mhla_core.ops.noncausal import mix as MX

    class _Cuda:
        is_cuda = True

    for M, k, rows, want in ((64, 64, 128, True), (256, 64, 512, True), (150, 64, 0, False), (600, 64, 0, False),
                             (64, 0, 0, False), (64, 64, 129, False)):
        q = torch.empty(1, M * 4, 2, 16, dtype=torch.bfloat16)  # B H M = 2 M rows
        cfg = replace(default_state_config(), mix_matmul_m_multiple=k, mix_matmul_min_rows=rows)
        plan = K.make_plan(q, q, 4, M, K.NORM_EXACT, cfg)
        assert MX._matmul_pays(plan, _Cuda()) == want, (M, k, rows)
        assert not MX._matmul_pays(plan, torch.empty(0))


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("normalize,normalizer", VARIANTS)
def test_cublas_mixing_output_dtypes(state_dtype, normalize, normalizer):
    """The cuBLAS mixing writes bf16 forward states and fp32 backward ones itself (per-head W, M = 8)."""
    cfg = _config("state", mix_impl="matmul", state_dtype=state_dtype)
    err, errs = _compare(2, 2, 8, 4, 16, 16, True, normalize, normalizer, dtype=torch.bfloat16, config=cfg)
    assert err < TOL[torch.bfloat16], errs


def test_auto_mixing_choice():
    """mix_impl "auto": weight-stationary for bf16 states up to mix_ws_max_m blocks, for fp32 states only
    when M fills its W row tiles, the tiled kernel beyond mix_ws_max_m."""
    from mhla_core.ops.noncausal import mix as MX

    cfg = replace(default_state_config(), mix_ws_kernel_fp32=MixStationaryLaunch(block_i=64))
    for M, dtype, want in ((150, torch.bfloat16, True), (150, torch.float32, False), (64, torch.float32, True),
                           (256, torch.float32, True), (600, torch.bfloat16, False)):
        q = torch.empty(1, M * 4, 2, 16, dtype=torch.bfloat16)
        plan = K.make_plan(q, q, 4, M, K.NORM_EXACT, cfg)
        assert MX._stationary_pays(plan, torch.empty(0, dtype=dtype)) == want, (M, dtype)
