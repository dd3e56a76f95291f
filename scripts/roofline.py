"""FLOPs, bytes and roofline floor of one non-causal MHLA fwd+bwd, for both paths, at the issue's shapes.

    python scripts/roofline.py [--flops 790e12] [--bandwidth 4.3e12] [--measured docs/results/bench_ops_2026-12-01.log]

Counts follow the kernels as written (bf16 tokens; block states X and the forward's X~ in bf16 unless
`--fp32-states`, the backward's X~ and gradients fp32, its X fp32 too with the exact normaliser, which is
what bench_ops times; head dims padded as the kernels pad them: the parallel path to a power of two, the
state path's state rows unpadded):

- parallel path: 8 tile products of 2 N^2 D each over fwd+bwd (fwd: q k^T, A v; dq: dO v^T, dS k;
  dkdv: k q^T, v dO^T, P^T dO, dS^T q); tokens: q, k, v read and o written forward, q, k, v, o, dO read and
  dq, dk, dv written backward.
- state path: token products 2 N Dk Dv each: forward 2 (state, output), backward 6 (state recompute, the
  backward query kernel's numerator, dS~ and dq, the key kernel's dk and dv); mixing GEMMs 2 M^2 C each
  (C = Dk Dv + Dk state columns): forward 1, backward 3 (mix, dW, mix^T); state passes of M C each:
  forward 4 (write X, mix read + write, output read), backward 10 (write X, mix read + write, query kernel
  read X~ + write dX~, dW read dX~ and X, mix^T read + write, key kernel read dX); token passes as the
  parallel path plus k, v read again by the backward's state kernel.

The floor is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): no kernel can beat it. `--measured` reads the
"MHLA triton" GPU-kernel column of a bench_ops log and puts it, with measured / floor, on the row of the
path the planner chooses for that shape (`plan.choose_path`, default config).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core.ops.noncausal.plan import DEFAULT_CONFIG, choose_path  # noqa: E402
from mhla_core.ops.triton_helpers import next_pow2  # noqa: E402
from scripts.bench_ops import NONCAUSAL_CUDA  # noqa: E402

SHAPES = NONCAUSAL_CUDA  # (name, B, H, N, D, M): the shapes bench_ops times
TOKEN_BYTES = 2  # bf16


def parallel(B: int, H: int, N: int, D: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one fwd+bwd on the parallel path."""
    flops = 8 * 2.0 * N * N * next_pow2(D) * B * H
    tokens = (4 + 8) * B * N * H * D * TOKEN_BYTES  # fwd q k v o; bwd q k v o dO dq dk dv
    return flops, tokens


def state(B: int, H: int, N: int, D: int, M: int, state_bytes: int = 2, exact: bool = True) -> tuple[float, float]:
    """(FLOPs, bytes) of one fwd+bwd on the block-state path; `state_bytes` of X and the forward's X~
    (2: bf16, the default `StateConfig.state_dtype`; 4: fp32). The backward's X~ and gradients are fp32,
    and its X too with the `exact` normaliser."""
    C = D * D + D
    flops = (8 * 2.0 * N * D * D + 4 * 2.0 * M * M * C) * B * H
    x_bwd = 4 if exact else state_bytes
    # fwd: write X, mix read X + write X~, output read X~; bwd: write X, mix read X (+ write X~ fp32),
    # dW read X; the other 7 backward passes are fp32 (X~ write, query kernel 2, dW dX~, mix^T 2, key kernel)
    per_row = 4 * state_bytes + 3 * x_bwd + 7 * 4
    states = per_row * M * C * float(B * H)
    tokens = (4 + 8 + 2) * B * N * H * D * TOKEN_BYTES
    return flops, states + tokens


def measured_gpu_ms(log: Path) -> dict[str, float]:
    """The 'MHLA triton' GPU-kernel fwd+bwd ms per shape name of a bench_ops markdown log."""
    out = {}
    for line in log.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 6 and cells[2] == "MHLA triton":
            name = re.sub(r"\s*\(.*\)$", "", cells[1])
            try:
                out[name] = float(cells[5])
            except ValueError:
                pass
    return out


def table(peak_flops: float, peak_bw: float, measured: dict[str, float], state_bytes: int = 2) -> str:
    head = ("| shape | path | GFLOP | MB | FLOP floor ms | byte floor ms | floor ms | measured GPU ms "
            "| measured / floor |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name, B, H, N, D, M in SHAPES:
        chosen = choose_path(B, H, N, N // M, D, D, TOKEN_BYTES, DEFAULT_CONFIG)
        for path, (f, b) in (("parallel", parallel(B, H, N, D)), ("state", state(B, H, N, D, M, state_bytes))):
            tf, tb = f / peak_flops * 1e3, b / peak_bw * 1e3
            floor = max(tf, tb)
            got = measured.get(name) if path == chosen else None
            path = f"**{path}** (chosen)" if path == chosen else path
            ratio = f"{got / floor:.1f}x" if got else "-"
            lines.append(f"| {name} | {path} | {f / 1e9:.1f} | {b / 1e6:.0f} | {tf:.3f} | {tb:.3f} | {floor:.3f} | "
                         f"{got if got else '-'} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flops", type=float, default=790e12, help="peak bf16 tensor FLOP/s (H200, measured)")
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="peak HBM bytes/s (H200, measured)")
    ap.add_argument("--measured", type=Path, default=None, help="a bench_ops log for the measured column")
    ap.add_argument("--fp32-states", action="store_true", help="count fp32 block states (before 2026-12-02)")
    args = ap.parse_args(argv)
    if args.flops <= 0 or args.bandwidth <= 0:
        ap.error("--flops and --bandwidth must be positive")
    measured = measured_gpu_ms(args.measured) if args.measured else {}
    text = table(args.flops, args.bandwidth, measured, 4 if args.fp32_states else 2)
    print(text)
    return text


if __name__ == "__main__":
    main()
