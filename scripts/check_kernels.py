"""Check the Triton MHLA kernels against a float64 reference on CUDA; print a table.

    python scripts/check_kernels.py [--markdown docs/kernels_check.md] [--quick] [--jobs 8]

`--jobs N` runs the cases in N processes on the one GPU (most of a case's time is Triton compiling
its kernels on the CPU) and prints one table.

Every check draws fresh random inputs, runs the op with backend="triton" in the given dtype,
and compares the output and the gradients of q, k, v and the mixing matrix with backend="torch"
on the same inputs upcast to float64: relative error ||x - ref|| / ||ref||. Tolerances: fp32
1e-3 (tf32 allowed), bf16 and fp16 2e-2; NaN never passes.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import BlockLayout, NoncausalConfig, causal_mixing_init, chunk_mhla, mhla  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# (B, H, N, Dk, Dv, blocks, per_head, normalize, normalizer)
NONCAUSAL = [
    (8, 6, 256, 64, 64, 16, False, True, "exact"),  # DiT-S
    (8, 6, 256, 64, 64, 16, False, True, "reference"),
    (1, 12, 31500, 128, 128, 150, False, True, "exact"),  # Wan 480p, L = 210
    (1, 12, 31500, 128, 128, 150, False, True, "reference"),
    (2, 4, 1000, 64, 64, 40, True, True, "exact"),  # L = 25
    (2, 4, 1000, 64, 64, 40, True, False, "exact"),
    (2, 3, 588, 32, 32, 12, False, True, "reference"),  # L = 49
    (1, 2, 768, 256, 256, 3, False, True, "exact"),  # head dim 256
    (2, 2, 630, 96, 160, 7, True, True, "reference"),  # Dk != Dv, L = 90
    (1, 4, 4096, 128, 128, 1, False, True, "exact"),  # one block: linear attention
]
# the same fields plus the forced path and the memory layout of q, k, v ("bnhd" or "bhnd")
NONCAUSAL_PATHS = [
    (4, 3, 256, 64, 64, 16, False, True, "exact", "parallel", "bnhd"),  # DeiT-T, L = 16 (row W)
    (4, 3, 256, 64, 64, 16, False, True, "reference", "parallel", "bhnd"),
    (2, 16, 256, 72, 72, 16, True, True, "exact", "parallel", "bnhd"),  # DiT-XL/2 256 px, per-head W
    (2, 16, 1024, 72, 72, 64, False, True, "reference", "parallel", "bhnd"),  # DiT-XL/2 512 px
    (2, 12, 1024, 128, 128, 16, False, False, "exact", "parallel", "bnhd"),  # L = 64 (scalar W)
    (2, 4, 1000, 96, 64, 40, True, True, "exact", "parallel", "bnhd"),  # L = 25 (one-hot W), Dk != Dv
    (2, 16, 1024, 72, 72, 64, False, True, "exact", "state", "bhnd"),
    (1, 12, 4096, 128, 128, 64, False, True, "reference", "state", "bnhd"),
]
# tokens in row-major grid order (`mhla(..., layout=)`): (B, H, grid, blocks, Dk, Dv, per_head, normalize,
# normalizer, path, memory layout); grids the blocks do not divide are padded
NONCAUSAL_GRIDS = [
    (4, 3, (14, 14), (4, 4), 64, 64, False, True, "reference", "parallel", "bnhd"),  # DeiT-T 224, native grid
    (2, 16, (16, 16), (4, 4), 72, 72, True, True, "exact", "parallel", "bhnd"),  # DiT-XL/2 256 px
    (2, 16, (32, 32), (8, 8), 72, 72, False, True, "reference", "state", "bnhd"),  # DiT-XL/2 512 px
    (2, 16, (31, 33), (8, 8), 72, 72, False, True, "reference", "parallel", "bnhd"),  # padded to 32 x 40
    (1, 12, (6, 15, 26), (2, 3, 5), 128, 128, False, False, "exact", "state", "bnhd"),  # Wan-like 3D, padded
    (2, 4, (1000,), (16,), 96, 64, True, True, "exact", "parallel", "bhnd"),  # 1D, padded to 1008
]
# (B, H, T, Dk, Dv, chunk, per_head, doc lengths or None)
CAUSAL = [
    (2, 4, 2048, 128, 256, 64, False, None),
    (1, 4, 1000, 128, 256, 64, True, None),  # partial last chunk
    (1, 2, 1500, 64, 64, 64, False, [700, 31, 769]),  # packed documents
    (3, 2, 513, 32, 64, 32, True, None),
    (1, 4, 8192, 128, 128, 64, False, None),
]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, N, H, D] values stored as [B, N, H, D] or as [B, H, N, D] (then viewed as [B, N, H, D])."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bhnd" else t


def check_noncausal(case, dtype) -> dict:
    B, H, N, Dk, Dv, M, per_head, normalize, normalizer, *rest = case
    path, layout = rest if rest else ("auto", "bnhd")
    q = _layout(torch.rand(B, N, H, Dk, device="cuda").to(dtype), layout)
    k = _layout(torch.rand(B, N, H, Dk, device="cuda").to(dtype), layout)
    v = _layout(torch.randn(B, N, H, Dv, device="cuda").to(dtype), layout)
    W = torch.rand(*((H, M, M) if per_head else (M, M)), device="cuda")
    dout = torch.randn(B, N, H, Dv, device="cuda")
    kw = dict(block_size=N // M, normalize=normalize, normalizer=normalizer)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W)]
    out = mhla(*leaves, backend="triton", config=NoncausalConfig(path=path), **kw)
    grads = _grads(out, leaves, dout.to(out.dtype))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, W)]
    ref = mhla(*ref_leaves, backend="torch", **kw)
    ref_grads = _grads(ref, ref_leaves, dout.double())
    errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    if M == 1 and normalize:
        # W = [[w]] cancels between numerator and denominator: dW is zero up to eps, so measure its
        # error against the gradient it would have without the cancellation, ||dO|| ||o|| / |w|.
        scale = (dout.double().norm() * ref.norm() / W.double().abs().sum()).item()
        errs[4] = (grads[3].double() - ref_grads[3]).norm().item() / scale
    return dict(shape=f"({B}, {H}, {N}, {Dk}/{Dv}, M={M}, L={N // M})",
                variant=f"{normalizer if normalize else 'unnormalized'}{', per-head' if per_head else ''}"
                        + (f", {path}, {layout}" if rest else ""),
                errs=errs)


def check_grid(case, dtype) -> dict:
    """A grid-order case: the reference permutes with BlockLayout.to_blocks / from_blocks around float64."""
    B, H, grid, blocks, Dk, Dv, per_head, normalize, normalizer, path, mem = case
    layout = BlockLayout(grid, blocks)
    N, M = layout.num_tokens, layout.num_blocks
    q = _layout(torch.rand(B, N, H, Dk, device="cuda").to(dtype), mem)
    k = _layout(torch.rand(B, N, H, Dk, device="cuda").to(dtype), mem)
    v = _layout(torch.randn(B, N, H, Dv, device="cuda").to(dtype), mem)
    W = torch.rand(*((H, M, M) if per_head else (M, M)), device="cuda")
    dout = torch.randn(B, N, H, Dv, device="cuda")
    kw = dict(normalize=normalize, normalizer=normalizer)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W)]
    out = mhla(*leaves, layout=layout, backend="triton", config=NoncausalConfig(path=path), **kw)
    grads = _grads(out, leaves, dout.to(out.dtype))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, W)]
    ref_in = [layout.to_blocks(t) for t in ref_leaves[:3]]
    ref = layout.from_blocks(mhla(*ref_in, ref_leaves[3], block_size=layout.block_size, backend="torch", **kw))
    ref_grads = _grads(ref, ref_leaves, dout.double())
    errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    return dict(shape=f"({B}, {H}, grid {'x'.join(map(str, grid))}, {Dk}/{Dv}, M={M}, L={layout.block_size})",
                variant=f"{normalizer if normalize else 'unnormalized'}{', per-head' if per_head else ''}, {path}, "
                        f"{mem}, grid{' padded' if layout.is_padded else ''}",
                errs=errs)


def check_causal(case, dtype) -> dict:
    B, H, T, Dk, Dv, C, per_head, docs = case
    q = (torch.rand(B, T, H, Dk, device="cuda") / math.sqrt(Dk)).to(dtype)
    k = (torch.rand(B, T, H, Dk, device="cuda") / math.sqrt(Dk)).to(dtype)
    v = torch.randn(B, T, H, Dv, device="cuda").to(dtype)
    L = math.ceil((max(docs) if docs else T) / C)
    W = causal_mixing_init(L).cuda() + 0.1 * torch.rand(*((H, L, L) if per_head else (L, L)), device="cuda")
    cu = torch.tensor([0] + list(torch.tensor(docs).cumsum(0)), device="cuda") if docs else None
    dout = torch.randn(B, T, H, Dv, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W)]
    out, _ = chunk_mhla(*leaves, chunk_size=C, cu_seqlens=cu, backend="triton")
    grads = _grads(out, leaves, dout.to(out.dtype))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, W)]
    ref, _ = chunk_mhla(*ref_leaves, chunk_size=C, cu_seqlens=cu, backend="torch")
    ref_grads = _grads(ref, ref_leaves, dout.double())
    errs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    return dict(shape=f"causal ({B}, {H}, {T}, {Dk}/{Dv}, C={C})",
                variant=("packed " + str(docs) if docs else "dense") + (", per-head" if per_head else ""), errs=errs)


def _cases(args) -> list[tuple]:
    """(check function name, case, dtype) of every check the arguments ask for, in table order."""
    dtypes = [torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16, torch.float16]
    nc, ca = (NONCAUSAL[:2], CAUSAL[:2]) if args.quick else (NONCAUSAL + NONCAUSAL_PATHS, CAUSAL)
    grids = [] if args.quick else NONCAUSAL_GRIDS
    if args.paths_only:
        nc, ca = NONCAUSAL_PATHS, []
    out = []
    for dtype in dtypes:
        if dtype == torch.float16:  # fp16: the parallel path, and grid order on both paths
            kinds = (("noncausal", NONCAUSAL_PATHS[:6]), ("grid", grids[:2] + grids[4:5]))
        else:
            kinds = (("noncausal", nc), ("grid", grids), ("causal", ca))
        out += [(fn, case, dtype) for fn, cases in kinds for case in cases]
    return out


CHECKS = {"noncausal": check_noncausal, "grid": check_grid, "causal": check_causal}


def _run(index: int, fn: str, case, dtype) -> dict:
    torch.manual_seed(index)
    try:
        r = CHECKS[fn](case, dtype)
    except Exception as err:  # report and continue: one failing case must not hide the others
        r = dict(shape=str(case), variant=f"ERROR {type(err).__name__}: {str(err)[:80]}", errs=[float("nan")] * 5)
    r["dtype"] = str(dtype).replace("torch.", "")
    r["ok"] = all(e <= TOL[dtype] for e in r["errs"])  # NaN compares False
    print(f"{r['dtype']:9s} {r['shape']:40s} {r['variant']:30s} "
          + " ".join(f"{e:.1e}" for e in r["errs"]) + ("" if r["ok"] else "  FAIL"), flush=True)
    return r


def _sharded(args, argv: list[str]) -> list[dict]:
    """Run the cases in args.jobs child processes (shard i takes every jobs-th case); rows in table order."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.jobs):
            out = Path(tmp) / f"shard{i}.json"
            cmd = [sys.executable, __file__, *argv, "--shard", f"{i}/{args.jobs}", "--rows-json", str(out)]
            procs.append((subprocess.Popen(cmd), out))
        rows = []
        for proc, out in procs:
            proc.wait()
            if out.exists():
                rows += json.loads(out.read_text())
            else:
                rows.append(dict(index=-1, dtype="?", shape=f"shard {out.stem} died (exit {proc.returncode})",
                                 variant="", errs=[float("nan")] * 5, ok=False))
    return sorted(rows, key=lambda r: r["index"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--quick", action="store_true", help="first two cases of each kind, bf16 only")
    ap.add_argument("--paths-only", action="store_true", help="only the forced-path non-causal cases")
    ap.add_argument("--jobs", type=int, default=1, help="processes sharing the GPU (compilation runs in parallel)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n", set by --jobs
    ap.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_kernels.py needs CUDA")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    cases = _cases(args)
    if args.jobs > 1:
        rows = _sharded(args, [f for f, on in (("--quick", args.quick), ("--paths-only", args.paths_only)) if on])
    else:
        shard, n_shards = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
        rows = [dict(_run(i, *c), index=i) for i, c in enumerate(cases) if i % n_shards == shard]
        if args.rows_json:
            import json

            Path(args.rows_json).write_text(json.dumps(rows))
            return
    failures = sum(not r["ok"] for r in rows)
    lines = ["| dtype | shape | variant | o | dq | dk | dv | dW | within tolerance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['variant']} | "
                     + " | ".join(f"{e:.1e}" for e in r["errs"]) + f" | {'yes' if r['ok'] else 'NO'} |")
    table = "\n".join(lines)
    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    try:
        import triton

        env += f", triton {triton.__version__}"
    except ImportError:
        pass
    print(f"\n{env}\n{table}\n{len(rows) - failures}/{len(rows)} checks within tolerance ({len(cases)} asked)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Measured with `python scripts/check_kernels.py` on {env}.\n\n{table}\n")
    raise SystemExit(1 if failures or len(rows) != len(cases) else 0)


if __name__ == "__main__":
    main()
