"""Time MHLA ops against softmax attention (SDPA) and linear attention on the current device.

    python scripts/bench_ops.py                      # CUDA: paper shapes; CPU: small shapes
    python scripts/bench_ops.py --markdown docs/benchmarks.md --plot docs/img/ops_ratio.svg --json rows.json

Non-causal: SDPA (flash and cuDNN backends on CUDA, the default backend on CPU), plain linear
attention in PyTorch, MHLA PyTorch reference, MHLA Triton. Causal: fla chunk_linear_attn (if
installed), MHLA reference (backend="torch"), MHLA Triton, and for T <= 2,048 the authors' form (a
Python loop over chunks, `scripts/causal_loop_baseline.py`, under torch.compile on CUDA). Times are
medians (CUDA events through
triton.testing.do_bench on CUDA, perf_counter on CPU); forward and forward+backward; peak memory
on CUDA is the allocator's peak during one fwd+bwd minus the inputs. `--markdown FILE` writes the
tables between `<!-- bench_ops:start -->` and `<!-- bench_ops:end -->` in FILE, keeping the rest of
the file and the `###` subsections this run did not measure (a file without the markers gets the
section appended). `--json FILE` saves every section's rows and the environment; `--plot FILE.svg` draws the
non-causal times over the best SDPA backend's (`scripts/bench_plot.py`, which redraws it from the JSON or the
printed tables on any machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import NoncausalConfig, causal_mixing_init, chunk_mhla, fused_recurrent_mhla, mhla  # noqa: E402
from mhla_core.ops.causal import chunk_mhla_triton  # noqa: E402
from mhla_core.ops.noncausal import mhla_triton  # noqa: E402
from scripts.authors_style_noncausal import authors_style_mhla  # noqa: E402
from scripts.bench_plot import best_sdpa as _best_sdpa  # noqa: E402
from scripts.bench_plot import noncausal_svg  # noqa: E402
from scripts.bench_timing import gpu_kernel_ms  # noqa: E402
from scripts.causal_loop_baseline import LOOP_MAX_TOKENS, chunk_loop_mhla  # noqa: E402
from scripts.doc_sections import merge_subsections, read_marked_section, write_marked_section  # noqa: E402

MARK_START, MARK_END = "<!-- bench_ops:start -->", "<!-- bench_ops:end -->"

# (name, B, H, N, D, blocks)
NONCAUSAL_CUDA = [
    ("DeiT-T 224", 128, 3, 256, 64, 16),
    ("DiT-XL/2 256", 32, 16, 256, 72, 16),
    ("DiT-XL/2 512", 16, 16, 1024, 72, 64),
    ("1K D128", 8, 12, 1024, 128, 16),
    ("DiT-XL/2 1024", 4, 16, 4096, 72, 256),
    ("4K", 1, 12, 4096, 128, 64),
    ("16K", 1, 12, 16384, 128, 64),
    ("Wan 480p", 1, 12, 31500, 128, 150),
    ("126K", 1, 12, 126000, 128, 600),
]
SDPA_MAX_TOKENS = 32768  # SDPA at 126K tokens takes minutes per call
AUTHORS_MAX_TOKENS = 4096  # their form materialises M x D x D states: timed up to 4K tokens
NONCAUSAL_CPU = [("small", 2, 4, 256, 32, 16), ("1K", 1, 4, 1024, 32, 16)]
# (name, B, H, T, Dk, Dv, chunk)
CAUSAL_CUDA = [("B8 T2K", 8, 4, 2048, 128, 256, 64), ("B1 T8K", 1, 4, 8192, 128, 256, 64),
               ("B1 T32K", 1, 4, 32768, 128, 256, 64)]
CAUSAL_CPU = [("T512", 1, 2, 512, 32, 32, 64)]


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def _measure(fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor], timer, device) -> dict:
    """Forward time, forward+backward time and extra peak memory (CUDA) of one implementation."""
    row: dict = {}
    try:
        with torch.no_grad():
            row["fwd"] = timer(fwd)
        grad = None

        def fwd_bwd():
            nonlocal grad
            out = fwd()
            if grad is None:
                grad = torch.randn_like(out)
            torch.autograd.grad(out, inputs, grad)

        row["fwdbwd"] = timer(fwd_bwd)
        if device.type == "cuda":
            row["gpu_fwdbwd"] = gpu_kernel_ms(fwd_bwd)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            row["mem"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. out of memory at 126K
        row["error"] = str(err).splitlines()[0][:60]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return run


def _linear_attention(q, k, v):
    """Plain (M = 1) linear attention in PyTorch, fp32 state."""
    kv = torch.einsum("bnhk,bnhv->bhkv", k.float(), v.float())
    num = torch.einsum("bnhk,bhkv->bnhv", q.float(), kv)
    den = torch.einsum("bnhk,bhk->bnh", q.float(), k.float().sum(1)) + 1e-6
    return (num / den.unsqueeze(-1)).to(v.dtype)


def _noncausal_impls(q, k, v, W, L, device) -> dict[str, Callable[[], torch.Tensor]]:
    impls: dict[str, Callable[[], torch.Tensor]] = {}
    if device.type == "cuda" and q.shape[1] <= SDPA_MAX_TOKENS:
        from torch.nn.attention import SDPBackend

        impls["SDPA flash"] = lambda: _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v)
        impls["SDPA cuDNN"] = lambda: _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)
    elif device.type != "cuda":
        impls["SDPA"] = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
    impls["linear attn (torch)"] = lambda: _linear_attention(q, k, v)
    if q.shape[1] <= AUTHORS_MAX_TOKENS:
        if device.type == "cuda":
            # static shapes, compiled afresh per shape: after two shapes dynamo would otherwise switch to a
            # dynamic-shape graph, which ran this baseline up to 1.7x slower (DiT-XL/2 512, 2026-12-02 log)
            torch._dynamo.reset()
            authors = torch.compile(authors_style_mhla, dynamic=False)
            impls["authors-style (torch.compile)"] = lambda: authors(q, k, v, W, L)
        else:
            impls["authors-style"] = lambda: authors_style_mhla(q, k, v, W, L)
    impls["MHLA reference (torch)"] = lambda: mhla(q, k, v, W, block_size=L, backend="torch")
    if device.type == "cuda" and mhla_triton is not None:
        state = NoncausalConfig(path="state")
        impls["MHLA triton, state path"] = lambda: mhla(q, k, v, W, block_size=L, backend="triton", config=state)
        impls["MHLA triton"] = lambda: mhla(q, k, v, W, block_size=L, backend="triton")
    return impls


def _causal_impls(q, k, v, W, C, device, chunk_linear_attn) -> dict[str, Callable[[], torch.Tensor]]:
    impls: dict[str, Callable[[], torch.Tensor]] = {}
    if chunk_linear_attn is not None and device.type == "cuda":
        impls["fla chunk_linear_attn"] = lambda: chunk_linear_attn(q, k, v, normalize=False)[0]
    impls["MHLA reference (torch)"] = lambda: chunk_mhla(q, k, v, W, chunk_size=C, backend="torch")[0]
    if device.type == "cuda" and chunk_mhla_triton is not None:
        impls["MHLA triton"] = lambda: chunk_mhla(q, k, v, W, chunk_size=C, backend="triton")[0]
    if q.shape[1] <= LOOP_MAX_TOKENS:
        if device.type == "cuda":
            torch._dynamo.reset()  # static shapes per shape, as for the non-causal baseline
            loop = torch.compile(chunk_loop_mhla, dynamic=False)
            impls["authors'-style loop (torch.compile)"] = lambda: loop(q, k, v, W, C)
        else:
            impls["authors'-style loop"] = lambda: chunk_loop_mhla(q, k, v, W, C)
    return impls


def noncausal_rows(shapes, device, dtype, timer) -> list[dict]:
    rows = []
    for name, B, H, N, D, M in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.rand(B, N, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        W = torch.rand(M, M, device=device, generator=g).requires_grad_()
        impls = _noncausal_impls(q, k, v, W, N // M, device)
        for impl, fn in impls.items():
            print(f"  {name:10s} {impl} ...", flush=True)
            row = _measure(fn, [q, k, v, W] if "MHLA" in impl else [q, k, v], timer, device)
            rows.append(dict(shape=f"{name} ({B}, {H}, {N}, {D}, {M})", tokens=N, impl=impl, **row))
    return rows


def causal_rows(shapes, device, dtype, timer) -> list[dict]:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        chunk_linear_attn = None
    rows = []
    for name, B, H, T, Dk, Dv, C in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k = (torch.rand(B, T, H, Dk, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
        v = torch.randn(B, T, H, Dv, device=device, dtype=dtype, generator=g).requires_grad_()
        W = causal_mixing_init(math.ceil(T / C)).to(device).requires_grad_()
        impls = _causal_impls(q, k, v, W, C, device, chunk_linear_attn)
        for impl, fn in impls.items():
            print(f"  {name:10s} {impl} ...", flush=True)
            row = _measure(fn, [q, k, v, W] if "MHLA" in impl else [q, k, v], timer, device)
            rows.append(dict(shape=f"{name} (B={B}, H={H}, T={T}, Dk={Dk}, Dv={Dv}, C={C})", tokens=T,
                             impl=impl, **row))
    return rows


# (name, B, H, prefill T, Dk, Dv, chunk, decoded tokens)
DECODE_CUDA = [("B8 after 2K", 8, 4, 2048, 128, 256, 64, 64)]
DECODE_CPU = [("B2 after 256", 2, 2, 256, 32, 32, 64, 16)]


def _mhla_decode(q, k, v, W, C, state, start, backend="torch") -> None:
    for t in range(start, q.shape[1]):
        _, state = fused_recurrent_mhla(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], W, chunk_size=C,
                                        initial_state=state, output_final_state=True, backend=backend)


def _fla_decode(fn, q, k, v, state, start) -> None:
    for t in range(start, q.shape[1]):
        _, state = fn(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], initial_state=state, output_final_state=True)


def decode_rows(shapes, device, dtype, timer) -> list[dict]:
    """Per-token decode time after a chunked prefill: MHLA's recurrent op vs fla's recurrent linear attention."""
    try:
        from fla.ops.linear_attn import fused_recurrent_linear_attn
    except ImportError:
        fused_recurrent_linear_attn = None
    rows = []
    for name, B, H, T, Dk, Dv, C, steps in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k = (torch.rand(B, T + steps, H, Dk, device=device, dtype=dtype, generator=g) for _ in range(2))
        v = torch.randn(B, T + steps, H, Dv, device=device, dtype=dtype, generator=g)
        W = causal_mixing_init(math.ceil((T + steps) / C)).to(device)
        _, state = chunk_mhla(q[:, :T], k[:, :T], v[:, :T], W, chunk_size=C, output_final_state=True)

        impls = {"MHLA fused_recurrent_mhla (PyTorch)": partial(_mhla_decode, q, k, v, W, C, state, T)}
        if device.type == "cuda" and chunk_mhla_triton is not None:
            impls["MHLA fused_recurrent_mhla (Triton)"] = partial(_mhla_decode, q, k, v, W, C, state, T, "triton")
        if fused_recurrent_linear_attn is not None and device.type == "cuda":
            h0 = torch.zeros(B, H, Dk, Dv, device=device)
            impls["fla fused_recurrent_linear_attn"] = partial(_fla_decode, fused_recurrent_linear_attn, q, k, v, h0, T)
        for impl, fn in impls.items():
            print(f"  {name:10s} {impl} ...", flush=True)
            with torch.no_grad():
                ms = timer(fn) / steps
            rows.append(dict(shape=f"{name} (B={B}, H={H}, Dk={Dk}, Dv={Dv}, C={C})", impl=impl, ms_per_token=ms,
                             tok_s=B / ms * 1e3))
    return rows


def decode_table(rows: list[dict]) -> str:
    lines = ["| shape | implementation | ms per decode step | tokens/s (all sequences) |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['impl']} | {r['ms_per_token']:.3f} | {r['tok_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """A markdown table; the ratio columns are each row's time over the best SDPA backend's (same shape)."""
    lines = ["| shape | implementation | fwd ms | fwd+bwd ms | GPU kernels fwd+bwd ms | peak extra GiB | "
             "fwd / best SDPA | fwd+bwd / best SDPA | GPU fwd+bwd / best SDPA |", "|---" * 9 + "|"]
    for r in rows:
        ratios = []
        for key in ("fwd", "fwdbwd", "gpu_fwdbwd"):
            best = _best_sdpa(rows, r["shape"], key)
            ratios.append(r[key] / best if best and r.get(key) else None)
        err = f" ({r['error']})" if "error" in r else ""
        lines.append(f"| {r['shape']} | {r['impl']}{err} | {_fmt(r.get('fwd'))} | {_fmt(r.get('fwdbwd'))} | "
                     f"{_fmt(r.get('gpu_fwdbwd'))} | {_fmt(r.get('mem'), '.2f')} | {_fmt(ratios[0], '.2f')} | "
                     f"{_fmt(ratios[1], '.2f')} | {_fmt(ratios[2], '.2f')} |")
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return (f"{card}, torch {torch.__version__}, triton {tv}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")


def write_section(path: str, section: str) -> None:
    """Put `section` between the bench_ops markers of the markdown file `path`, keeping the rest."""
    write_marked_section(path, section, "bench_ops")


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--only", choices=["noncausal", "causal", "decode"], default=None)
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NAME",
                    help="non-causal shapes to time, by name (e.g. 'Wan 480p'); default all")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU")
    ap.add_argument("--markdown", default=None, help="write the tables to this markdown file")
    ap.add_argument("--plot", default=None, help="write an SVG of the non-causal times / best SDPA backend's")
    ap.add_argument("--json", default=None, help="write every section's rows and the environment to this file")
    args = ap.parse_args(argv)
    if args.plot and not args.plot.endswith(".svg"):
        ap.error("--plot writes SVG: give a .svg path")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    timer = _timer(device, args.reps)
    cuda = device.type == "cuda"
    env = environment(device)
    print(f"# {env}, {dtype}")
    sections = []  # (title, rows, table)
    if args.only in (None, "noncausal"):
        shapes = NONCAUSAL_CUDA if cuda else NONCAUSAL_CPU
        if args.shapes:
            known = [s[0] for s in shapes]
            unknown = [n for n in args.shapes if n not in known]
            if unknown:
                ap.error(f"--shapes: unknown {unknown}; choose from {known}")
            shapes = [s for s in shapes if s[0] in args.shapes]
        rows = noncausal_rows(shapes, device, dtype, timer)
        sections.append(("Non-causal (shape: B, H, N, D, blocks)", rows, table(rows)))
    if args.only in (None, "causal"):
        rows = causal_rows(CAUSAL_CUDA if cuda else CAUSAL_CPU, device, dtype, timer)
        sections.append(("Causal (chunked)", rows, table(rows)))
    if args.only in (None, "decode"):
        rows = decode_rows(DECODE_CUDA if cuda else DECODE_CPU, device, dtype, timer)
        sections.append(("Decode (one token per sequence per step, after a chunked prefill)", rows, decode_table(rows)))
    measured = f"Measured with `python scripts/bench_ops.py` on {env}, {dtype}. Medians."
    text = "\n\n".join(f"### {title}\n\n{measured}\n\n{body}" for title, _, body in sections)
    print(f"\n{text}\n")
    if args.markdown:  # subsections this run did not measure stay as they were
        write_section(args.markdown, merge_subsections(read_marked_section(args.markdown, "bench_ops"), text))
    if args.json:
        data = dict(environment=env, dtype=str(dtype), sections=[dict(title=t, rows=r) for t, r, _ in sections])
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    if args.plot and sections[0][0].startswith("Non-causal"):
        Path(args.plot).write_text(noncausal_svg(sections[0][1], f"{env}, {dtype}"))
    return text


if __name__ == "__main__":
    main()
