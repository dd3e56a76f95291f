"""Compile the parallel path's kernels for sm_90 (H200) on a machine without a GPU, before spending GPU time.

    python scripts/compile_check.py --shape 128 3 256 64 16 --variants default blocks [--normalizer exact]

Runs the op's launchers on CPU tensors with Triton's launch intercepted, so every kernel it would launch
for that shape and `ParallelTiles` variant (scripts/sweep_parallel.py's VARIANTS) is recorded with its
argument types and constexprs; each is then compiled for sm_90 with Triton's own ptxas. Prints, per
launch, "ok" with the shared memory it needs, or the compiler's error. Catches front-end and
back-end failures (unsupported reshapes or layouts, shared memory over the 232 KB limit); it runs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: this compiles for the GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core.ops.noncausal import parallel as P  # noqa: E402
from scripts.sweep_parallel import VARIANTS  # noqa: E402

POINTERS = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16", torch.int32: "*i32",
            torch.int64: "*i64"}
SHARED_LIMIT = 232448  # bytes per block on the H200


def record_launches(fn) -> list[tuple[JITFunction, tuple, dict]]:
    """Call fn() with every Triton launch recorded instead of run."""
    launches = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = run
    try:
        fn()
    finally:
        JITFunction.run = original
    return launches


def source(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The ASTSource and options of one recorded launch (pointers 16-byte aligned, integers i32/i64)."""
    values = dict(zip([p.name for p in kernel.params], args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = POINTERS[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, int):
            signature[p.name] = "i32" if abs(int(v)) < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    return ASTSource(kernel, signature, constexprs, attrs), options


def sass_summary(compiled) -> str:
    """Instruction counts of the SASS: all, wgmma (HGMMA), mma.sync (HMMA), local-memory spills (LDL/STL)."""
    import subprocess
    import tempfile

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = [ln.split("*/", 1)[1].split()[0] for ln in sass.splitlines()
           if ln.strip().startswith("/*") and "*/" in ln and len(ln.split("*/", 1)[1].split()) > 0
           and not ln.split("*/", 1)[1].strip().startswith("/*")]
    ops = [o for o in ops if not o.startswith("0x")]

    def count(prefix):
        return sum(o.lstrip("@!P0123456789").startswith(prefix) or prefix in o for o in ops)

    return (f", SASS {len(ops)} instr, HGMMA {count('HGMMA')}, HMMA {count('HMMA')}, "
            f"LDL/STL {count('LDL') + count('STL')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=5, metavar=("B", "H", "N", "D", "M"), required=True)
    ap.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    ap.add_argument("--normalizer", default="exact", choices=["exact", "reference", "none"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sass", action="store_true", help="also count instructions of the SASS")
    args = ap.parse_args()
    B, H, N, D, M = args.shape
    if N % M:
        ap.error(f"N = {N} is not a multiple of M = {M}")
    L = N // M
    dt = getattr(torch, args.dtype)
    norm = {"exact": 1, "reference": 2, "none": 0}[args.normalizer]
    q, k, v, do = (torch.zeros(1, N, H, D, dtype=dt) for _ in range(4))
    w3 = torch.zeros(M, M)
    failures = 0
    target = GPUTarget("cuda", 90, 32)
    for name in args.variants:
        tiles = VARIANTS[name]

        def both(tiles=tiles):
            o, r = P.forward(q, k, v, w3, 0, L, norm, 1e-6, D ** -0.5, tiles)
            P.backward(do, q, k, v, w3, 0, o, r, L, norm, 1e-6, D ** -0.5, True, tiles)

        for kernel, kargs, kwargs in record_launches(both):
            src, options = source(kernel, kargs, dict(kwargs))
            label = f"{name:12s} {kernel.fn.__name__:18s} {options}"
            try:
                compiled = triton.compile(src, target=target, options=options)
            except Exception as e:  # noqa: BLE001 - every compiler failure is reported
                failures += 1
                msg = " | ".join(str(e).strip().splitlines()[-3:] + [repr(e.__cause__ or "")])
                print(f"{label}: FAILED {type(e).__name__}: {msg[:600]}", flush=True)
                continue
            shared = compiled.metadata.shared
            flag = "" if shared <= SHARED_LIMIT else " OVER THE SHARED-MEMORY LIMIT"
            failures += bool(flag)
            print(f"{label}: ok, shared {shared} B{flag}{sass_summary(compiled) if args.sass else ''}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
