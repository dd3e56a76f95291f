"""Which path runs a non-causal MHLA call: the parallel (quadratic) kernels or the block-state kernels.

The choice comes from a cost model of the forward + backward on an H200 (docs/kernels.md fits it):

    parallel: 8 N^2 (Dk' + Dv') FLOPs per (b, h) (8 tile products fwd + bwd), Dk', Dv' the padded
              head dims, at par_flops_scalar when blocks hold whole 64-token tiles (one W entry per
              tile pair) and at par_flops_mixed otherwise (W through one-hot products and atomics)
    state:    ~15 passes over the fp32 block states (M Dk Dv 4 bytes per (b, h)) plus 8 over the
              tokens, at state_bw, plus state_launch for its 9 launches

Both terms scale with B * H alike, so the crossover moves with the batch only through launch cost.
`NoncausalConfig` is the one object that sets the choice and every kernel setting: `parallel` (the
parallel path's `ParallelTiles`) and `state` (the block-state path's `StateConfig`: its tiles, Dv tiling,
direct variant and mixing). Tests and sweeps build their own configs; no module globals are read.
Path choices are cached per (shape, config), and so are the state path's plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from mhla_core.ops.noncausal.parallel import ParallelTiles, default_tiles, dim_tiles
from mhla_core.ops.noncausal.state_config import StateConfig, default_state_config
from mhla_core.ops.utils import cached_hash, config_getstate

PATHS = ("auto", "parallel", "state")
GRID_GATHER = ("auto", "always", "never")


@dataclass(frozen=True)
class NoncausalConfig:
    """Settings of the non-causal Triton op.

    path: "auto" (cost model), "parallel" or "state" (the block-state kernels, which pick their
    direct variant themselves unless `state.variant` forces one). The cost constants are effective
    rates measured on an H200.
    parallel: tiles and launch settings of the parallel path (`ParallelTiles`).
    state: settings of the block-state path (`StateConfig`: launch tiles, Dv tiling, the direct
        variant's limits and cost model, mixing implementation and precision, a forced variant).
    Both default to the GPU values, or to small tiles under the Triton interpreter.
    """

    __hash__ = cached_hash
    __getstate__ = config_getstate

    path: str = "auto"
    parallel: ParallelTiles = field(default_factory=default_tiles)
    state: StateConfig = field(default_factory=default_state_config)
    par_flops_scalar: float = 380e12
    par_flops_mixed: float = 100e12
    par_launch: float = 8e-6
    state_bw: float = 1.2e12
    state_launch: float = 30e-6
    parallel_max_tokens: int = 16384
    # grid-order inputs: "auto" (gather_in_kernel's measured rule), "always" (the kernels gather token
    # rows through the layout's map), "never" (permute to block order first)
    grid_gather: str = "auto"
    # the parallel kernels' tiles are sized for head dims up to 128 (fp32 at 256 overflows shared memory)
    parallel_max_head_dim: int = 128

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.grid_gather not in GRID_GATHER:
            raise ValueError(f"grid_gather must be one of {GRID_GATHER}, got {self.grid_gather!r}")
        if not isinstance(self.state, StateConfig):
            raise ValueError(f"state must be a StateConfig, got {type(self.state).__name__}")


DEFAULT_CONFIG = NoncausalConfig()


def parallel_cost(BH: int, N: int, L: int, DK: int, DV: int, cfg: NoncausalConfig) -> float:
    """Modelled seconds of one forward + backward on the parallel path."""
    split, tail = cfg.parallel.split_dims, cfg.parallel.split_min_tail
    flops = 8.0 * BH * N * N * (sum(dim_tiles(DK, split, tail)) + sum(dim_tiles(DV, split, tail)))
    rate = cfg.par_flops_scalar if L % 64 == 0 else cfg.par_flops_mixed
    return flops / rate + cfg.par_launch


def state_cost(BH: int, N: int, L: int, DK: int, DV: int, esize: int, cfg: NoncausalConfig) -> float:
    """Modelled seconds of one forward + backward on the block-state path."""
    M = N // L
    state_bytes = 15.0 * BH * M * (DK * DV + DK + L) * 4
    token_bytes = 8.0 * BH * N * (DK + DV) * esize
    return (state_bytes + token_bytes) / cfg.state_bw + cfg.state_launch


@lru_cache(maxsize=4096)
def choose_path(B: int, H: int, N: int, L: int, DK: int, DV: int, esize: int, cfg: NoncausalConfig) -> str:
    """"parallel" or "state" for one call shape."""
    if cfg.path != "auto":
        return cfg.path
    if N > cfg.parallel_max_tokens or max(DK, DV) > cfg.parallel_max_head_dim:
        return "state"
    par = parallel_cost(B * H, N, L, DK, DV, cfg)
    state = state_cost(B * H, N, L, DK, DV, esize, cfg)
    return "parallel" if par <= state else "state"


def gather_in_kernel(B: int, H: int, N: int, L: int, DK: int, DV: int, esize: int, cfg: NoncausalConfig) -> bool:
    """Whether grid-order inputs are gathered by the kernels (True) or permuted to block order first.

    Measured on the H200 (docs/kernels.md, `scripts/bench_layout.py`): gathering beats the permutation
    copies on the state path (DiT-XL/2 512, Wan) and on the parallel path with power-of-two head dims
    (DeiT-T), but the parallel kernels with padded head dims (DiT-XL/2's 72) ran 1.5x slower gathering
    (GPU 1.79 vs 1.15 ms fwd+bwd at DiT-XL/2 256 with the copies included), so those permute first.
    """
    if cfg.grid_gather != "auto":
        return cfg.grid_gather == "always"
    pow2 = all(d & (d - 1) == 0 for d in (DK, DV))
    return pow2 or choose_path(B, H, N, L, DK, DV, esize, cfg) != "parallel"


__all__ = ["gather_in_kernel", "NoncausalConfig", "StateConfig", "DEFAULT_CONFIG", "PATHS", "choose_path",
           "parallel_cost", "state_cost"]
