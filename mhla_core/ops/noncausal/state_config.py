"""Settings of the non-causal block-state path (`chunk.py`): one frozen, hashable `StateConfig`.

`NoncausalConfig.state` carries it to `chunk.forward` / `backward`, whose `make_plan` caches a
`Plan` per (shapes, dtype, L, M, norm, config). Tests and sweeps build their own configs
(`dataclasses.replace(default_state_config(), ...)`); nothing reads module globals.

This module imports nothing from Triton, so `plan.py` can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mhla_core.ops.utils import INTERPRET, cached_hash, config_getstate

VARIANTS = ("auto", "state", "direct")
MIX_IMPLS = ("triton", "stationary", "auto", "matmul")
MIX_PRECS = ("tf32", "tf32x3", "ieee", "bf16")
STATE_DTYPES = ("float32", "bfloat16")
BWD_TF32 = ("exact", "always", "never")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_block(owner: str, name: str, x) -> None:
    if not _is_int(x) or x < 16 or x & (x - 1):
        raise ValueError(f"{owner}{name} must be a power of two >= 16, got {x!r}")


def _check_launch(owner: str, num_warps, num_stages) -> None:
    if not _is_int(num_warps) or not 1 <= num_warps <= 32 or num_warps & (num_warps - 1):
        raise ValueError(f"{owner}num_warps must be a power of two in 1 .. 32, got {num_warps!r}")
    if not _is_int(num_stages) or num_stages < 1:
        raise ValueError(f"{owner}num_stages must be an int >= 1, got {num_stages!r}")


@dataclass(frozen=True)
class Launch:
    """num_warps / num_stages of a kernel without a configurable tile (the direct variants)."""

    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        _check_launch("Launch.", self.num_warps, self.num_stages)


@dataclass(frozen=True)
class TokenLaunch:
    """A token kernel (`_state`, `_out`, `_bwd_q`, `_bwd_kv`): its token tile and launch settings.
    The tile is clipped to the block size (and to `fp32_block_t` for fp32 inputs)."""

    block_t: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        _check_block("TokenLaunch.", "block_t", self.block_t)
        _check_launch("TokenLaunch.", self.num_warps, self.num_stages)


@dataclass(frozen=True)
class MixLaunch:
    """The mixing kernel `_mix` (X~ = W X over blocks): one row tile, in place, up to M = block_i blocks,
    row tiles of block_i_large blocks (out of place) beyond; block_j blocks and block_c state columns a step."""

    block_i: int = 256
    block_i_large: int = 128
    block_j: int = 32
    block_c: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_i", "block_i_large", "block_j", "block_c"):
            _check_block("MixLaunch.", name, getattr(self, name))
        _check_launch("MixLaunch.", self.num_warps, self.num_stages)


@dataclass(frozen=True)
class MixStationaryLaunch:
    """The weight-stationary mixing kernel `_mix_ws`: block_i rows of W per program (all M columns of
    them, held while it streams), block_c state columns a step, and columns split over programs until
    there are at least min_programs."""

    block_i: int = 64
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 3
    min_programs: int = 528

    def __post_init__(self) -> None:
        for name in ("block_i", "block_c"):
            _check_block("MixStationaryLaunch.", name, getattr(self, name))
        _check_launch("MixStationaryLaunch.", self.num_warps, self.num_stages)
        if not _is_int(self.min_programs) or self.min_programs < 1:
            raise ValueError(f"MixStationaryLaunch.min_programs must be an int >= 1, got {self.min_programs!r}")


@dataclass(frozen=True)
class DwLaunch:
    """The dW reduction `_dw`: block_i x block_i tiles of dW, block_c state columns a step, and columns
    split over programs until there are at least min_programs."""

    block_i: int = 128
    block_c: int = 64
    num_warps: int = 8
    num_stages: int = 3
    min_programs: int = 512

    def __post_init__(self) -> None:
        for name in ("block_i", "block_c"):
            _check_block("DwLaunch.", name, getattr(self, name))
        _check_launch("DwLaunch.", self.num_warps, self.num_stages)
        if not _is_int(self.min_programs) or self.min_programs < 1:
            raise ValueError(f"DwLaunch.min_programs must be an int >= 1, got {self.min_programs!r}")


_LAUNCH_TYPES = {
    "state_kernel": TokenLaunch, "out_kernel": TokenLaunch, "bwd_q_kernel": TokenLaunch,
    "bwd_q_kernel_hp": TokenLaunch, "bwd_kv_kernel": TokenLaunch, "direct_kernel": Launch,
    "direct_kernel_large": Launch,
    "mix_kernel": MixLaunch, "mix_kernel_bf16": MixLaunch, "dw_kernel": DwLaunch,
    "mix_ws_kernel": MixStationaryLaunch, "mix_ws_kernel_fp32": MixStationaryLaunch,
}


@dataclass(frozen=True)
class StateConfig:
    """Settings of the block-state kernels; the defaults are the H200 values (docs/kernels.md).

    variant: "auto" (direct when the limits allow it and the cost model says it is cheaper), "state"
        (always the state kernels) or "direct" (whenever L <= 128 and Dv fits one tile, else state).
    state_kernel, out_kernel, bwd_q_kernel, bwd_kv_kernel: token tile / warps / stages of the token
        kernels (bwd_q_kernel_hp for `_bwd_q` with fp32 S~ operands, whose 64-token tiles spill at
        D = 128); direct_kernel (head tiles up to 64 x 64) and direct_kernel_large: warps / stages of
        the direct variants (whose token tile is the whole block); mix_kernel (tf32 operands) and
        mix_kernel_bf16 (bf16 operands): the tiled mixing GEMM; dw_kernel: the dW reduction.
    max_block_dv, max_block_dv_fp32: largest Dv tile for half / fp32 inputs; a larger Dv is split over
        programs. fp32_block_t: largest token tile for fp32 inputs (exact fp32 dots keep their
        operands in registers).
    direct_max_m, direct_max_l, direct_max_d: the direct variant is allowed when M, L and Dk, Dv are
        at most these; cost_flops (effective tensor-core FLOP/s of the small dots), cost_bw (effective
        HBM bytes/s) and cost_launch (seconds per extra launch) are its forward cost model.
    mix_prec_half: tl.dot precision of the fp32 mixing GEMMs for half inputs ("tf32", "tf32x3", "ieee",
        or "bf16": bf16 operands). mix_impl: "stationary" (the weight-stationary `_mix_ws` kernel, whose
        programs hold W [block_i, next_pow2(M)] in registers, so for small M; settings `mix_ws_kernel` for
        bf16 operands, `mix_ws_kernel_fp32` for tf32 ones), "auto" (stationary while next_pow2(M) <=
        mix_ws_max_m, else triton; before all that, on CUDA, "matmul" when M is a multiple of
        mix_matmul_m_multiple, 0 for never, and B H M >= mix_matmul_min_rows), "triton" (the `_mix` kernel, in place) or "matmul" (one
        batched cuBLAS GEMM writing its output dtype itself, with one more state buffer; H200: faster at
        DiT-XL/2 512 and 1024, M = 64 and 256, slower at Wan, M = 150; docs/kernels.md).
    bwd_tf32_half: when the backward's products with S~ (numerator recompute, dq) of half inputs take
        tf32 operands instead of bf16: "exact" (with the exact normaliser only, where dq = s (S~ g + c z~)
        is a difference of two close terms; without a normaliser or with the reference one dq has no
        such term), "always" (the behaviour before 2026-12-02) or "never". fp16 inputs always use tf32.
    state_dtype: storage of the block states X and of the forward's mixed states X~ for half inputs:
        "float32", or "bfloat16" (half their bytes; the mixing of bf16 states takes bf16 operands,
        accumulation stays fp32). The backward's X~ and the state gradients stay fp32, and so does its X
        for the exact normaliser: there dq is a difference of two close terms, which bf16 states cost
        10x its accuracy. fp32 inputs keep fp32 states.
    """

    __hash__ = cached_hash
    __getstate__ = config_getstate

    variant: str = "auto"
    state_kernel: TokenLaunch = field(default_factory=lambda: TokenLaunch(64, 8, 2))
    out_kernel: TokenLaunch = field(default_factory=lambda: TokenLaunch(64, 8, 2))
    bwd_q_kernel: TokenLaunch = field(default_factory=lambda: TokenLaunch(64, 8, 2))
    bwd_q_kernel_hp: TokenLaunch = field(default_factory=lambda: TokenLaunch(32, 8, 2))
    bwd_kv_kernel: TokenLaunch = field(default_factory=lambda: TokenLaunch(64, 8, 2))
    direct_kernel: Launch = field(default_factory=lambda: Launch(4, 2))
    direct_kernel_large: Launch = field(default_factory=lambda: Launch(8, 2))
    mix_kernel: MixLaunch = field(default_factory=MixLaunch)
    mix_kernel_bf16: MixLaunch = field(default_factory=lambda: MixLaunch(32, 64, 64, 128, 4, 3))
    mix_ws_kernel: MixStationaryLaunch = field(default_factory=MixStationaryLaunch)
    mix_ws_kernel_fp32: MixStationaryLaunch = field(default_factory=lambda: MixStationaryLaunch(128, 64, 8, 2))
    mix_ws_max_m: int = 256
    mix_matmul_m_multiple: int = 64
    mix_matmul_min_rows: int = 4096
    dw_kernel: DwLaunch = field(default_factory=DwLaunch)
    max_block_dv: int = 128
    max_block_dv_fp32: int = 64
    fp32_block_t: int = 16
    direct_max_m: int = 32
    direct_max_l: int = 64
    direct_max_d: int = 128
    cost_flops: float = 400e12
    cost_bw: float = 3.0e12
    cost_launch: float = 5e-6
    mix_prec_half: str = "tf32"
    mix_impl: str = "auto"
    bwd_tf32_half: str = "exact"
    state_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"StateConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mix_impl not in MIX_IMPLS:
            raise ValueError(f"StateConfig.mix_impl must be one of {MIX_IMPLS}, got {self.mix_impl!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"StateConfig.state_dtype must be one of {STATE_DTYPES}, got {self.state_dtype!r}")
        if self.mix_prec_half not in MIX_PRECS:
            raise ValueError(f"StateConfig.mix_prec_half must be one of {MIX_PRECS}, got {self.mix_prec_half!r}")
        for name, kind in _LAUNCH_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"StateConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        for name in ("max_block_dv", "max_block_dv_fp32", "fp32_block_t"):
            _check_block("StateConfig.", name, getattr(self, name))
        if not _is_int(self.mix_ws_max_m) or self.mix_ws_max_m < 1:
            raise ValueError(f"StateConfig.mix_ws_max_m must be an int >= 1, got {self.mix_ws_max_m!r}")
        if not _is_int(self.mix_matmul_min_rows) or self.mix_matmul_min_rows < 0:
            raise ValueError(f"StateConfig.mix_matmul_min_rows must be an int >= 0, got {self.mix_matmul_min_rows!r}")
        if not _is_int(self.mix_matmul_m_multiple) or self.mix_matmul_m_multiple < 0:
            raise ValueError("StateConfig.mix_matmul_m_multiple must be an int >= 0 (0: never cuBLAS in 'auto'), "
                             f"got {self.mix_matmul_m_multiple!r}")
        for name in ("direct_max_m", "direct_max_l", "direct_max_d"):
            x = getattr(self, name)
            if not _is_int(x) or x < 1:
                raise ValueError(f"StateConfig.{name} must be an int >= 1, got {x!r}")
        for name in ("cost_flops", "cost_bw", "cost_launch"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
                raise ValueError(f"StateConfig.{name} must be a finite number > 0, got {x!r}")
        if self.bwd_tf32_half not in BWD_TF32:
            raise ValueError(f"StateConfig.bwd_tf32_half must be one of {BWD_TF32}, got {self.bwd_tf32_half!r}")


# small tiles keep the interpreter fast (CPU tests); everything else as on the GPU
_SMALL = TokenLaunch(16, 4, 1)
INTERPRET_STATE_CONFIG = StateConfig(
    state_kernel=_SMALL, out_kernel=_SMALL, bwd_q_kernel=_SMALL, bwd_q_kernel_hp=_SMALL, bwd_kv_kernel=_SMALL,
    mix_kernel=MixLaunch(block_i=256, block_i_large=16, block_j=16, block_c=256, num_warps=4, num_stages=1),
    mix_kernel_bf16=MixLaunch(block_i=256, block_i_large=16, block_j=16, block_c=256, num_warps=4, num_stages=1),
    dw_kernel=DwLaunch(block_i=128, block_c=256, num_warps=4, num_stages=1, min_programs=1),
    mix_ws_kernel=MixStationaryLaunch(block_i=64, block_c=256, num_warps=4, num_stages=1, min_programs=1),
    mix_ws_kernel_fp32=MixStationaryLaunch(block_i=64, block_c=256, num_warps=4, num_stages=1, min_programs=1),
)


def default_state_config() -> StateConfig:
    """The GPU defaults; small tiles under the Triton interpreter (CPU tests)."""
    return INTERPRET_STATE_CONFIG if INTERPRET else StateConfig()


__all__ = ["StateConfig", "TokenLaunch", "Launch", "MixLaunch", "MixStationaryLaunch", "DwLaunch",
           "default_state_config", "INTERPRET", "INTERPRET_STATE_CONFIG", "VARIANTS", "MIX_IMPLS", "MIX_PRECS",
           "STATE_DTYPES", "BWD_TF32"]
