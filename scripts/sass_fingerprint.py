"""Fingerprint the machine code of every Triton kernel launch the CPU tests make, without a GPU.

    python scripts/sass_fingerprint.py --out before.json            # on the old code
    python scripts/sass_fingerprint.py --out after.json             # on the new code
    python scripts/sass_fingerprint.py --compare before.json after.json

For refactors of the kernels that should not change what runs on the GPU. Step 1 runs the Triton kernel tests
(`tests/core/test_*_triton.py`) under TRITON_INTERPRET=1 and records each distinct launch: kernel, argument
dtypes and constexpr values, warps and stages. Step 2, in a process without the interpreter, compiles each
launch for sm_90 (H200) with Triton's own ptxas and hashes the SASS that cuobjdump prints (instructions and
their encodings). Equal hashes mean the GPU runs the same instructions in the same order. Triton's line
information (debug labels) can move ptxas' scheduling of inlined helpers: `--no-line-info` compiles without it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/core/test_causal_triton.py", "tests/core/test_noncausal_triton.py"]
POINTER_TYPES = {"torch.bfloat16": "*bf16", "torch.float32": "*fp32", "torch.float16": "*fp16",
                 "torch.int32": "*i32", "torch.int64": "*i64"}


class LaunchRecorder:
    """pytest plugin (interpreter mode): collects one JSON line per distinct kernel launch."""

    def __init__(self) -> None:
        self.launches: set[str] = set()

    def pytest_configure(self, config) -> None:  # noqa: ARG002 - pytest hook signature
        import torch
        from triton.runtime import interpreter

        original = interpreter.InterpretedFunction.run
        launches = self.launches

        def describe(x):
            if isinstance(x, torch.Tensor):
                return ["ptr", str(x.dtype)]
            for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
                if isinstance(x, types):
                    return [kind, x]
            return ["none", None]

        def run(fn_self, *args, grid, warmup, **kwargs):
            rec = {"module": fn_self.fn.__module__, "name": fn_self.fn.__name__,
                   "args": [describe(a) for a in args], "kwargs": {k: describe(v) for k, v in kwargs.items()}}
            launches.add(json.dumps(rec, sort_keys=True))
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run


def record(path: Path) -> None:
    """Run the kernel tests under the interpreter and write the distinct launches to `path`."""
    import pytest

    recorder = LaunchRecorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *[str(ROOT / t) for t in TESTS]], plugins=[recorder])
    if code != 0:
        raise SystemExit(f"the kernel tests failed (pytest exit {code}); fingerprints would be meaningless")
    path.write_text("".join(line + "\n" for line in sorted(recorder.launches)))


def compile_config(rec: dict):
    """(key, ASTSource, options) of one recorded launch; integers are plain i32/i64, pointers 16-byte aligned."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    values = dict(zip([p.name for p in fn.params], rec["args"]))
    options = {}
    for k, v in rec["kwargs"].items():
        if k in ("num_warps", "num_stages"):
            options[k] = v[1]
        else:
            values[k] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        kind, value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif kind == "ptr":
            signature[p.name] = POINTER_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int":
            signature[p.name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    key = json.dumps([rec["name"], signature, constexprs, options], sort_keys=True)
    return key, ASTSource(fn, signature, constexprs, attrs), options


def fingerprint(launches: Path, out: Path) -> None:
    """Compile every recorded launch for sm_90 and write {launch: sha256 of its SASS / instruction count}."""
    import triton
    from triton.backends.compiler import GPUTarget

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    target = GPUTarget("cuda", 90, 32)
    configs = {}
    for line in launches.read_text().splitlines():
        key, src, options = compile_config(json.loads(line))
        configs[key] = (src, options)
    result = {}
    for n, (key, (src, options)) in enumerate(sorted(configs.items()), 1):
        kernel = triton.compile(src, target=target, options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        lines = [" ".join(s.split()) for s in sass.splitlines() if s.strip().startswith("/*")]
        result[key] = f"{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()[:16]}/{len(lines) // 2}"
        print(f"[{n}/{len(configs)}] {json.loads(key)[0]}: {result[key]}", flush=True)
    out.write_text(json.dumps(result, indent=0, sort_keys=True))


def compare(a: Path, b: Path) -> int:
    """Print how many launches have equal SASS; exit status 1 when any differs."""
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    common = sorted(set(x) & set(y))
    differ = [k for k in common if x[k] != y[k]]
    for k in differ:
        print(f"differs: {json.loads(k)[0]} {json.loads(k)[2]} {x[k]} -> {y[k]}")
    print(f"{len(common) - len(differ)} of {len(common)} launches have identical SASS "
          f"({len(set(x) ^ set(y))} launches in only one file)")
    return 1 if differ or set(x) != set(y) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the fingerprints of the current code here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    p.add_argument("--no-line-info", action="store_true", help="compile without Triton's line information")
    p.add_argument("--record-only", type=Path, help=argparse.SUPPRESS)  # step 1, in the interpreter subprocess
    args = p.parse_args(argv)
    if args.record_only:
        record(args.record_only)
        return 0
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out FILE or --compare BEFORE AFTER")
    with tempfile.TemporaryDirectory() as tmp:
        launches = Path(tmp) / "launches.jsonl"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        subprocess.run([sys.executable, __file__, "--record-only", str(launches)], env=env, check=True, cwd=ROOT)
        print(f"{len(launches.read_text().splitlines())} distinct launches recorded", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if args.no_line_info:
            env["TRITON_DISABLE_LINE_INFO"] = "1"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from scripts.sass_fingerprint import fingerprint; from pathlib import Path; "
                        f"fingerprint(Path({str(launches)!r}), Path({str(args.out.resolve())!r}))"],
                       env=env, check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
