"""Check and time the non-causal parallel path's tile variants against the state path and SDPA (CUDA).

    python scripts/sweep_parallel.py [--shapes deit dit256 ...] [--variants ...] [--jobs 12]
        [--per-kernel] [--host-profile] [--out results.json]

For every shape: the parallel path in bf16 against a float64 reference on one batch entry (output and
all four gradients), then fwd and fwd+bwd medians (triton.testing.do_bench) of each `ParallelTiles`
variant, of the state path and of the best SDPA backend, in one run. Prints one table last.
--jobs N first checks every (shape, variant) in N subprocesses at once: that compiles the kernels in
parallel into Triton's cache, and a variant whose check faults or gives NaN is left out of the timing
(a fault would end the timing process). --per-kernel adds each kernel's CUDA time (torch.profiler);
--host-profile prints where the host time of one eager fwd+bwd goes (cProfile, first shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import mhla  # noqa: E402
from mhla_core.ops.noncausal.parallel import ParallelTiles  # noqa: E402
from mhla_core.ops.noncausal.plan import NoncausalConfig  # noqa: E402
from scripts.bench_timing import gpu_kernel_ms  # noqa: E402

SHAPES = {  # name: (B, H, N, D, M)
    "deit": (128, 3, 256, 64, 16),
    "dit256": (32, 16, 256, 72, 16),
    "dit512": (16, 16, 1024, 72, 64),
    "1k": (8, 12, 1024, 128, 16),
    "dit1024": (4, 16, 4096, 72, 256),
    "4k": (1, 12, 4096, 128, 64),
}
SHAPES["deit_l64"] = (128, 3, 256, 64, 4)  # DeiT-T with 64-token blocks: scalar W per tile pair (a ceiling)


def _all(bq, bk, warps, stages, **kw) -> ParallelTiles:
    return ParallelTiles(bq, bk, warps, stages, bq, bk, warps, stages, bq, bk, warps, stages, **kw)


VARIANTS = {
    "default": ParallelTiles(),
    "before": ParallelTiles(w_mode="onehot", dw_mode="onehot"),  # the defaults until 2026-12-02 (third session)
    "split": ParallelTiles(split_dims=True),  # head dims as a power of two plus a tail tile (72 = 64 + 16)
    "split_window": ParallelTiles(split_dims=True, split_tail="window"),  # tail = columns D - 16 .. D - 1
    "split32": ParallelTiles(split_dims=True, split_min_tail=32),  # 72 = 64 + a 32-wide tail
    "split32_window": ParallelTiles(split_dims=True, split_tail="window", split_min_tail=32),
    "split_s1": _all(64, 64, 4, 1, split_dims=True),  # no software pipelining
    "q128": ParallelTiles(128, 64, 8, 2, 128, 64, 8, 2, 128, 64, 8, 2),
    "s3": ParallelTiles(64, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 3),
    "onehot": ParallelTiles(w_mode="onehot"),
    "onehot_dwr": ParallelTiles(w_mode="onehot", dw_mode="reshape"),
    "blocks": ParallelTiles(w_mode="blocks", dw_mode="reshape"),
    "blocks_dwoh": ParallelTiles(w_mode="blocks", dw_mode="onehot"),
    "expand": ParallelTiles(w_mode="expand", dw_mode="reshape"),
    "dense": ParallelTiles(w_mode="dense", dw_mode="reshape"),
    "blocks_q128": _all(128, 64, 8, 2, w_mode="blocks", dw_mode="reshape"),
    "blocks_s3": _all(64, 64, 4, 3, w_mode="blocks", dw_mode="reshape"),
    "blocks_k32": _all(64, 32, 4, 2, w_mode="blocks", dw_mode="reshape"),
    "blocks_k128": _all(64, 128, 8, 2, w_mode="blocks", dw_mode="reshape"),
    "blocks_w8": _all(64, 64, 8, 2, w_mode="blocks", dw_mode="reshape"),
    "expand_s3": _all(64, 64, 4, 3, w_mode="expand", dw_mode="reshape"),
    "blocks_dkdv8": ParallelTiles(64, 64, 4, 2, 64, 64, 4, 2, 64, 64, 8, 2, w_mode="blocks", dw_mode="reshape"),
    "blocks_bwd8": ParallelTiles(64, 64, 4, 2, 64, 64, 8, 2, 64, 64, 8, 2, w_mode="blocks", dw_mode="reshape"),
    "blocks_q128_dkdv8": ParallelTiles(128, 64, 8, 2, 64, 64, 4, 2, 64, 64, 8, 2, w_mode="blocks",
                                       dw_mode="reshape"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(shape, cfg: NoncausalConfig, dtype=torch.bfloat16, normalizer="exact", normalize=True) -> float:
    """Largest relative error of o, dq, dk, dv, dW on one batch entry against float64."""
    errs = check_errors(shape, cfg, dtype, normalizer, normalize)
    return float("nan") if any(e != e for e in errs) else max(errs)


def check_errors(shape, cfg: NoncausalConfig, dtype=torch.bfloat16, normalizer="exact",
                 normalize=True) -> list[float]:
    """Relative errors of o, dq, dk, dv, dW on one batch entry against float64 (which kernel is off)."""
    _, H, N, D, M = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k = (torch.rand(1, N, H, D, device="cuda", generator=g) for _ in range(2))
    v, do = (torch.randn(1, N, H, D, device="cuda", generator=g) for _ in range(2))
    w = torch.rand(M, M, device="cuda", generator=g)
    kw = dict(block_size=N // M, normalize=normalize, normalizer=normalizer)
    out = []
    for dt, backend in ((dtype, "triton"), (torch.float64, "torch")):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)] + [w.to(torch.float32 if dt != torch.float64
                                                                         else dt).requires_grad_()]
        o = mhla(*leaves, backend=backend, config=cfg if backend == "triton" else None, **kw)
        out.append([o, *torch.autograd.grad(o, leaves, do.to(o.dtype))])
    return [_rel(a, b) for a, b in zip(*out)]


def _time(fn, inputs):
    """(fwd, fwd+bwd) ms: eager do_bench medians (host launch cost included where it dominates)."""
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(fn, warmup=10, rep=50, return_mode="median")
    grad = torch.randn_like(fn())
    fb = do_bench(lambda: torch.autograd.grad(fn(), inputs, grad), warmup=10, rep=50, return_mode="median")
    return fwd, fb


def gpu_ms(fn, inputs) -> float:
    """GPU kernel ms of one forward + backward."""
    grad = torch.randn_like(fn())
    return gpu_kernel_ms(lambda: torch.autograd.grad(fn(), inputs, grad))


def kernel_ms(fn, inputs, steps: int = 5) -> dict[str, float]:
    """CUDA ms per fwd+bwd of each kernel (torch.profiler), by kernel name."""
    grad = torch.randn_like(fn())
    torch.autograd.grad(fn(), inputs, grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(fn(), inputs, grad)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            out[e.key[:40]] = out.get(e.key[:40], 0.0) + e.device_time_total / steps / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def host_profile(fn, inputs, reps: int = 30, rows: int = 25) -> None:
    """cProfile of `reps` eager fwd+bwd calls: where the host time goes."""
    import cProfile
    import pstats
    import time

    grad = torch.randn_like(fn())
    for _ in range(3):
        torch.autograd.grad(fn(), inputs, grad)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(fn(), inputs, grad)
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"host ms per eager call: fwd {(t1 - t0) * 1e3 / reps:.3f}, fwd+bwd {(t2 - t1) * 1e3 / reps:.3f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        torch.autograd.grad(fn(), inputs, grad)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def precheck(shapes, variants, normalizer: str, jobs: int) -> dict[tuple[str, str], str]:
    """Check each (shape, variant) in its own subprocess, `jobs` at a time: {(shape, variant): result}."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def one(sv):
        cmd = [sys.executable, __file__, "--check-only", "--shapes", sv[0], "--variants", sv[1],
               "--normalizer", normalizer]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        last = ([ln for ln in r.stdout.splitlines() if "max rel err" in ln] or ["(no check line)"])[-1]
        return sv, last if r.returncode == 0 else f"FAILED rc={r.returncode}: {r.stderr.strip()[-600:]}"

    pairs = [(s_, v_) for s_ in shapes for v_ in variants]
    with ThreadPoolExecutor(jobs) as ex:
        res = dict(ex.map(one, pairs))
    for sv, line in res.items():
        print(f"  precheck {sv[0]} {sv[1]}: {line}", flush=True)
    return res


def _usable(line: str) -> bool:
    if "FAILED" in line or "nan" in line:
        return False
    try:
        return float(line.rsplit(" ", 1)[-1]) < 2e-2
    except ValueError:
        return False


def host_ms(fn, reps: int = 50) -> float:
    """Host milliseconds per eager call (launch overhead), measured without waiting for the GPU."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def sdpa_best(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    gpu = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        try:
            res[name] = _time(fn, [q, k, v])
            gpu[name] = gpu_ms(fn, [q, k, v])
        except RuntimeError as err:
            print(f"    sdpa {name}: {str(err)[:80]}")
    return min(r[0] for r in res.values()), min(r[1] for r in res.values()), {"eager": res, "gpu fwd+bwd": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--normalizer", default="exact")
    ap.add_argument("--check-only", action="store_true", help="only the float64 checks (for compute-sanitizer)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=0, help="check (and compile) variants in N subprocesses first")
    ap.add_argument("--per-kernel", action="store_true", help="CUDA ms of each kernel per variant")
    ap.add_argument("--host-profile", action="store_true", help="cProfile of the default variant's host time")
    ap.add_argument("--table-from", default=None, help="print the table of the JSON files in this folder")
    args = ap.parse_args()
    if args.table_from:
        rows = [r for f in sorted(Path(args.table_from).glob("*.json")) for r in json.loads(f.read_text())]
        print_table(rows, args.variants)
        return
    usable = None
    if args.jobs and not args.check_only:
        pre = precheck(args.shapes, args.variants, args.normalizer, args.jobs)
        usable = {sv for sv, line in pre.items() if _usable(line)}
    rows = []
    for name in args.shapes:
        B, H, N, D, M = shape = SHAPES[name]
        if args.check_only:
            for vname in args.variants:
                cfg = NoncausalConfig(path="parallel", parallel=VARIANTS[vname])
                errs = check_errors(shape, cfg, normalizer=args.normalizer)
                worst = float("nan") if any(e != e for e in errs) else max(errs)
                parts = " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv", "dW"), errs))
                print(f"{name} {vname}: {parts}; max rel err {worst:.1e}", flush=True)
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.rand(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        w = torch.rand(M, M, device="cuda", generator=g).requires_grad_()
        sf, sb, detail = sdpa_best(q, k, v)
        print(f"{name}: sdpa {detail}", flush=True)
        row = dict(shape=name, sdpa_fwd=sf, sdpa_fb=sb)
        cands = {"state": NoncausalConfig(path="state")}
        cands.update({v_: NoncausalConfig(path="parallel", parallel=VARIANTS[v_]) for v_ in args.variants})
        if N > 4096:
            cands = {"state": cands["state"]}
        if usable is not None:
            cands = {c: cfg for c, cfg in cands.items() if c == "state" or (name, c) in usable}
        for cname, cfg in cands.items():
            try:
                err = check(shape, cfg, normalizer=args.normalizer)
                f, fb = _time(partial(mhla, q, k, v, w, block_size=N // M, normalizer=args.normalizer,
                                      config=cfg), [q, k, v, w])
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"  {cname}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                if "illegal memory" in str(e):
                    break
                continue
            gpu = gpu_ms(partial(mhla, q, k, v, w, block_size=N // M, normalizer=args.normalizer, config=cfg),
                         [q, k, v, w])
            row[cname] = (f, fb, err, gpu)
            print(f"  {cname:8s} fwd {f:.3f} fwd+bwd {fb:.3f} (GPU kernels {gpu:.3f}) err {err:.1e}  "
                  f"(x SDPA {f / sf:.2f} / {fb / sb:.2f})", flush=True)
            if args.per_kernel:
                ks = kernel_ms(partial(mhla, q, k, v, w, block_size=N // M, normalizer=args.normalizer,
                                       config=cfg), [q, k, v, w])
                row[cname + "/kernels"] = ks
                print("      " + ", ".join(f"{kn} {t:.4f}" for kn, t in list(ks.items())[:6]), flush=True)
        if "default" in row:  # [B, H, N, D] tensors viewed as [B, N, H, D]
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
            cfg = cands["default"]
            f, fb = _time(partial(mhla, qt, kt, vt, w, block_size=N // M, config=cfg), [qt, kt, vt, w])
            row["default_bhnd"] = (f, fb, 0.0, 0.0)
            row["host_fwd_ms"] = host_ms(partial(mhla, q.detach(), k.detach(), v.detach(), w.detach(),
                                                 block_size=N // M, config=cfg))
            print(f"  host ms per eager fwd call {row['host_fwd_ms']:.3f}", flush=True)
            if args.host_profile and name == args.shapes[0]:
                host_profile(partial(mhla, q, k, v, w, block_size=N // M, normalizer=args.normalizer, config=cfg),
                             [q, k, v, w])
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows, args.variants)


def print_table(rows, variants) -> None:
    print("\n| shape | SDPA fwd / fwd+bwd ms | " + " | ".join(["state", *variants, "default_bhnd"]) + " |")
    for r in rows:
        cells = []
        for c in ["state", *variants, "default_bhnd"]:
            if c in r and len(r[c]) == 4:
                f, fb, e, gpu = r[c]
                cells.append(f"{f:.3f}/{fb:.3f} ({f / r['sdpa_fwd']:.2f}x/{fb / r['sdpa_fb']:.2f}x) "
                             f"g{gpu:.3f} e{e:.0e}")
            else:
                cells.append("-")
        print(f"| {r['shape']} | {r['sdpa_fwd']:.3f} / {r['sdpa_fb']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
