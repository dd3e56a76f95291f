"""Isolate the bf16 error of split head dims on the GPU (docs/kernels.md, issue 12).

    python scripts/probe_split_dot.py            # CUDA (or TRITON_INTERPRET=1 on the CPU, slowly)

Part 1, the parallel kernels: o of the split forward, per column range (the main 64 columns, the tail),
and the split backward fed with o and r of the padded forward (are dq, dk, dW wrong only through
delta = dO . o?). Part 2, micro kernels of the forward's pattern: A = bf16(q k^T) in registers, then
acc1 += A v1 (64 columns) and acc2 += A v2 (the tail tile), in the variants listed in `PROBES`. Each
line gives the relative error of each product against fp32 torch of the same bf16 A.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core.ops.noncausal import parallel as P  # noqa: E402
from mhla_core.ops.noncausal.parallel import _times_blocks  # noqa: E402
from mhla_core.ops.noncausal.plan import NoncausalConfig  # noqa: E402
from mhla_core.ops.noncausal.triton_ops import _backward, _forward  # noqa: E402
from mhla_core.ops.triton_helpers import cast as _cast  # noqa: E402
from mhla_core.ops.triton_helpers import dot as _dot  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _tiles(split: bool) -> P.ParallelTiles:
    return P.ParallelTiles(64, 64, 4, 1, 64, 64, 4, 1, 64, 64, 4, 1, split_dims=split)


def kernel_cases(B: int = 2, H: int = 2, M: int = 16, L: int = 16, Dk: int = 72, Dv: int = 72) -> None:
    """o per column range of the split forward; the split backward from the padded forward's o, r."""
    g = torch.Generator().manual_seed(0)
    N = M * L
    q, k = (torch.rand(B, N, H, Dk, generator=g) for _ in range(2))
    v, do = (torch.randn(B, N, H, Dv, generator=g) for _ in range(2))
    w = torch.rand(M, M, generator=g)
    args = (None, L, True, "exact", 1e-6, 1.0)
    ref = [t.to(DEVICE, torch.float64).requires_grad_() for t in (q, k, v, w)]
    from mhla_core import mhla

    o64 = mhla(*ref, block_size=L, backend="torch")
    g64 = torch.autograd.grad(o64, ref, do.to(DEVICE, torch.float64))
    xs = [t.to(DEVICE, torch.bfloat16) for t in (q, k, v)] + [w.to(DEVICE)]
    d = do.to(DEVICE, torch.bfloat16)
    pad, split = (NoncausalConfig(path="parallel", parallel=_tiles(s)) for s in (False, True))
    for name, cfg in (("padded", pad), ("split", split)):
        o, _ = _forward(*xs, *args, cfg)
        print(f"kernels Dk {Dk} Dv {Dv} fwd {name:6s}: o[:64] {_rel(o[..., :64], o64[..., :64]):.1e}  "
              f"o[64:] {_rel(o[..., 64:], o64[..., 64:]):.1e}", flush=True)
    for fname, fcfg, bname, bcfg in (("padded", pad, "padded", pad), ("padded", pad, "split", split),
                                     ("split", split, "split", split)):
        o, r = _forward(*xs, *args, fcfg)
        grads = _backward(d, *xs, None, o, r, *args[1:], True, bcfg)
        parts = " ".join(f"{n} {_rel(a, b):.1e}" for n, a, b in zip(("dq", "dk", "dv", "dW"), grads, g64))
        print(f"kernels Dk {Dk} Dv {Dv} fwd {fname:6s} bwd {bname:6s}: {parts}", flush=True)


@triton.jit
def _probe_kernel(q_ptr, k_ptr, v_ptr, a_ptr, w_ptr, o1_ptr, o2_ptr, N,
                  D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                  MODE: tl.constexpr, A_MEM: tl.constexpr, TAIL_T: tl.constexpr, SPLIT_K: tl.constexpr,
                  WB: tl.constexpr):
    """MODE 0: both products; 1: the tail product only; 2: the tail as (v2^T A^T)^T; 3: the tail product
    first. A_MEM: A loaded from a_ptr (bf16 [N, N]) instead of computed. TAIL_T: v2 loaded transposed.
    SPLIT_K: the scores as q[:, :32] k[:, :32]^T + q[:, 32:64] k[:, 32:64]^T, two products into one
    accumulator (the split head dim's score pattern). WB: the scores times W [N / 16, N / 16] on 16 x 16
    sub-tiles by a 4D view (`parallel._times_blocks`, the kernels' block-aligned W mode)."""
    pq = tl.program_id(0)
    rq = pq * BQ + tl.arange(0, BQ)
    c1 = tl.arange(0, D1)
    c2 = D1 + tl.arange(0, D2)
    q = tl.load(q_ptr + rq[:, None] * D + c1[None, :])
    acc1 = tl.zeros([BQ, D1], dtype=tl.float32)
    acc2 = tl.zeros([BQ, D2], dtype=tl.float32)
    acc2t = tl.zeros([D2, BQ], dtype=tl.float32)
    for k0 in range(0, N, BK):
        rk = k0 + tl.arange(0, BK)
        if A_MEM:
            a = tl.load(a_ptr + rq[:, None] * N + rk[None, :])
        else:
            if SPLIT_K:
                h0 = tl.arange(0, D1 // 2)
                qa = tl.load(q_ptr + rq[:, None] * D + h0[None, :])
                qb = tl.load(q_ptr + rq[:, None] * D + D1 // 2 + h0[None, :])
                ka = tl.load(k_ptr + rk[None, :] * D + h0[:, None])
                kb = tl.load(k_ptr + rk[None, :] * D + D1 // 2 + h0[:, None])
                a = _cast(_dot(qb, kb, _dot(qa, ka, None, "tf32"), "tf32"), tl.bfloat16)
            else:
                kt = tl.load(k_ptr + rk[None, :] * D + c1[:, None])
                s = _dot(q, kt, None, "tf32")
                if WB:
                    ci = pq * (BQ // 16) + tl.arange(0, BQ // 16)
                    cj = k0 // 16 + tl.arange(0, BK // 16)
                    wt = tl.load(w_ptr + ci[:, None] * (N // 16) + cj[None, :])
                    s = _times_blocks(s, wt, BQ, BK, 16)
                a = _cast(s, tl.bfloat16)
        v1 = tl.load(v_ptr + rk[:, None] * D + c1[None, :])
        if TAIL_T:
            v2 = tl.trans(tl.load(v_ptr + rk[None, :] * D + c2[:, None], mask=c2[:, None] < D, other=0.0))
        else:
            v2 = tl.load(v_ptr + rk[:, None] * D + c2[None, :], mask=c2[None, :] < D, other=0.0)
        if MODE == 0:
            acc1 = _dot(a, v1, acc1, "tf32")
            acc2 = _dot(a, v2, acc2, "tf32")
        elif MODE == 1:
            acc2 = _dot(a, v2, acc2, "tf32")
        elif MODE == 2:
            acc1 = _dot(a, v1, acc1, "tf32")
            acc2t = _dot(tl.trans(v2), tl.trans(a), acc2t, "tf32")
        else:
            acc2 = _dot(a, v2, acc2, "tf32")
            acc1 = _dot(a, v1, acc1, "tf32")
    tl.store(o1_ptr + rq[:, None] * D1 + c1[None, :], acc1)
    if MODE == 2:
        tl.store(o2_ptr + rq[None, :] * D2 + tl.arange(0, D2)[:, None], acc2t)
    else:
        tl.store(o2_ptr + rq[:, None] * D2 + tl.arange(0, D2)[None, :], acc2)


# (name, D, D2, MODE, A_MEM, TAIL_T, SPLIT_K, WB)
PROBES = [
    ("both, tail 16 masked (72)", 72, 16, 0, False, False, False, False),
    ("tail only", 72, 16, 1, False, False, False, False),
    ("tail first", 72, 16, 3, False, False, False, False),
    ("tail transposed product", 72, 16, 2, False, False, False, False),
    ("tail loaded transposed", 72, 16, 0, False, True, False, False),
    ("A from memory", 72, 16, 0, True, False, False, False),
    ("tail 16 unmasked (80)", 80, 16, 0, False, False, False, False),
    ("tail 32 masked (72)", 72, 32, 0, False, False, False, False),
    ("tail 64 (128, no mask)", 128, 64, 0, False, False, False, False),
    ("scores split in K, tail 16", 72, 16, 0, False, False, True, False),
    ("scores split in K, 128", 128, 64, 0, False, False, True, False),
    ("W blocks, tail 16", 72, 16, 0, False, False, False, True),
    ("W blocks, 128", 128, 64, 0, False, False, False, True),
    ("W blocks, tail 16 transposed product", 72, 16, 2, False, False, False, True),
]


def micro_case(index: int, stages: int, N: int = 256, BQ: int = 64, BK: int = 64) -> None:
    g = torch.Generator().manual_seed(1)
    for name, D, D2, mode, a_mem, tail_t, split_k, wb in PROBES[index:index + 1]:
        q = torch.rand(N, D, generator=g).to(DEVICE, torch.bfloat16)
        k = torch.rand(N, D, generator=g).to(DEVICE, torch.bfloat16)
        v = torch.randn(N, D, generator=g).to(DEVICE, torch.bfloat16)
        w = torch.rand(N // 16, N // 16, generator=g).to(DEVICE)
        s = q[:, :64].float() @ k[:, :64].float().T
        if wb:
            s = s * w.repeat_interleave(16, 0).repeat_interleave(16, 1)
        a = s.to(torch.bfloat16)
        vpad = torch.nn.functional.pad(v.float(), (0, 64 + D2 - D))
        ref = a.float() @ vpad
        o1 = torch.empty(N, 64, device=DEVICE)
        o2 = torch.empty(N, D2, device=DEVICE)
        _probe_kernel[(N // BQ,)](q, k, v, a, w, o1, o2, N, D=D, D1=64, D2=D2, BQ=BQ, BK=BK, MODE=mode,
                                  A_MEM=a_mem, TAIL_T=tail_t, SPLIT_K=split_k, WB=wb, num_warps=4, num_stages=stages)
        e1 = _rel(o1, ref[:, :64]) if mode != 1 else float("nan")
        print(f"micro {name:30s} stages {stages}: A v1 {e1:.1e}  A v2 {_rel(o2, ref[:, 64:]):.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-kernels", action="store_true", help="only the micro kernels")
    ap.add_argument("--micro", type=int, nargs=2, metavar=("INDEX", "STAGES"), help="run one micro case here")
    args = ap.parse_args()
    if args.micro:
        micro_case(*args.micro)
        return
    for stages in (1, 2):  # one process per case: a case that faults on the GPU does not stop the others
        for i, probe in enumerate(PROBES):
            r = subprocess.run([sys.executable, __file__, "--micro", str(i), str(stages)], capture_output=True,
                               text=True)
            print(r.stdout.strip() or f"micro {probe[0]:30s} stages {stages}: failed: "
                  f"{(r.stderr.strip().splitlines() or ['?'])[-1][:120]}", flush=True)
    if not args.skip_kernels:
        for dk, dv in ((72, 72), (72, 64), (64, 72)):
            kernel_cases(Dk=dk, Dv=dv)


if __name__ == "__main__":
    main()
