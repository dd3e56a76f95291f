"""Time grid-order MHLA (`mhla(..., layout=)`) against the block-order copies it replaces.

    python scripts/bench_layout.py [--markdown docs/benchmarks.md] [--only DeiT-T]
    python scripts/bench_layout.py --only "DiT-XL/2 256" --variants default s1 s3 w8 t32 q128

At the token grids of the paper's models, q, k, v are strided views of one qkv projection output
in row-major grid order, as in `mhla_core.MHLA`. "grid order" passes them with `layout=`; "to_blocks
copies" is what the layer did before: `BlockLayout.to_blocks` on q, k, v, the op on block-major
tokens, `from_blocks` on the output. Both use the op's default path; `--variants` adds grid-order rows
with other parallel-path tiles (names in VARIANTS). bf16 on CUDA, fwd and fwd+bwd,
`triton.testing.do_bench` medians and the summed GPU kernel time of one fwd+bwd (torch.profiler).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core import BlockLayout, NoncausalConfig, mhla  # noqa: E402
from mhla_core.ops.noncausal.parallel import ParallelTiles  # noqa: E402
from scripts.bench_timing import gpu_kernel_ms  # noqa: E402
from scripts.doc_sections import merge_subsections, read_marked_section, write_marked_section  # noqa: E402

# (name, B, H, D, grid, blocks, normalize, normalizer)
SHAPES = [
    ("DeiT-T 224 (padded to 16x16)", 128, 3, 64, (16, 16), (4, 4), True, "reference"),
    ("DeiT-T 224 native 14x14", 128, 3, 64, (14, 14), (4, 4), True, "reference"),
    ("DiT-XL/2 256", 32, 16, 72, (16, 16), (4, 4), True, "reference"),
    ("DiT-XL/2 512", 16, 16, 72, (32, 32), (8, 8), True, "reference"),
    ("Wan 480p 81 frames", 1, 12, 128, (21, 30, 50), (3, 5, 10), False, "exact"),
]


VARIANTS = {  # parallel-path tiles: (bq, bk, warps, stages) for all three kernels
    "default": (64, 64, 4, 2), "s1": (64, 64, 4, 1), "s3": (64, 64, 4, 3), "w8": (64, 64, 8, 2),
    "t32": (32, 32, 4, 2), "q128": (128, 64, 8, 2),
}


def _tiles(name: str) -> NoncausalConfig:
    t = VARIANTS[name]
    return NoncausalConfig(path="parallel", parallel=ParallelTiles(*t, *t, *t))


def _inputs(B, H, D, layout, device, dtype):
    N = layout.num_tokens
    qkv = torch.rand(B, N, 3, H, D, device=device, dtype=dtype).requires_grad_()
    q, k, v = qkv.unbind(dim=2)  # strided views, as the layer's chunked projection gives
    W = torch.rand(layout.num_blocks, layout.num_blocks, device=device).requires_grad_()
    return qkv, (q, k, v, W)


def _time(fn, leaves, timer) -> tuple[float, float, float]:
    with torch.no_grad():
        fwd = timer(fn)
    grad = torch.randn_like(fn())

    def fwd_bwd():
        torch.autograd.grad(fn(), leaves, grad)

    return fwd, timer(fwd_bwd), gpu_kernel_ms(fwd_bwd)


def _grid_order(q, k, v, W, layout: BlockLayout, kw: dict) -> torch.Tensor:
    return mhla(q, k, v, W, layout=layout, **kw)


def _copies(q, k, v, W, layout: BlockLayout, kw: dict) -> torch.Tensor:
    qb, kb, vb = (layout.to_blocks(t) for t in (q, k, v))
    return layout.from_blocks(mhla(qb, kb, vb, W, block_size=layout.block_size, **kw))


def rows(shapes, device, dtype, variants=()) -> list[dict]:
    from triton.testing import do_bench

    def timer(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    out = []
    for name, B, H, D, grid, blocks, normalize, normalizer in shapes:
        layout = BlockLayout(grid, blocks)
        qkv, (q, k, v, W) = _inputs(B, H, D, layout, device, dtype)
        kw = dict(normalize=normalize, normalizer=normalizer, backend="triton")
        grid_order = partial(_grid_order, q, k, v, W, layout, kw)
        copies = partial(_copies, q, k, v, W, layout, kw)
        err = ((grid_order().float() - copies().float()).norm() / copies().float().norm()).item()
        impls = [("to_blocks copies (before)", copies), ("grid order (layout=)", grid_order)]
        impls += [(f"grid order, parallel tiles {vname} {VARIANTS[vname]}",
                   partial(_grid_order, q, k, v, W, layout, dict(kw, config=_tiles(vname)))) for vname in variants]
        for impl, fn in impls:
            f, fb, gpu = _time(fn, [qkv, W], timer)
            out.append(dict(shape=f"{name} (B={B}, H={H}, D={D}, grid {grid}, blocks {blocks})", impl=impl,
                            fwd=f, fwdbwd=fb, gpu=gpu, err=err))
            print(f"{name:30s} {impl:26s} fwd {f:.3f} fwd+bwd {fb:.3f} GPU {gpu:.3f} ms (rel diff {err:.1e})",
                  flush=True)
    return out


def table(rs: list[dict]) -> str:
    lines = ["| shape | implementation | fwd ms | fwd+bwd ms | GPU kernels fwd+bwd ms | fwd+bwd / before |",
             "|---|---|---|---|---|---|"]
    before = {}
    for r in rs:
        before.setdefault(r["shape"], r["fwdbwd"])
        lines.append(f"| {r['shape']} | {r['impl']} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | {r['gpu']:.3f} | "
                     f"{r['fwdbwd'] / before[r['shape']]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", default=None, help="merge the table into this file's bench_ops section")
    ap.add_argument("--only", default=None, help="shapes whose name starts with this")
    ap.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                    help="extra grid-order rows with these parallel-path tiles")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_layout.py needs CUDA")
    shapes = [s for s in SHAPES if args.only is None or s[0].startswith(args.only)]
    if not shapes:
        ap.error(f"--only {args.only!r} matches none of {[s[0] for s in SHAPES]}")
    import triton

    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    body = table(rows(shapes, torch.device("cuda"), torch.bfloat16, args.variants))
    import datetime

    text = (f"### Grid-order inputs against block-order copies\n\nMeasured with `python scripts/bench_layout.py` on "
            f"{env}, {datetime.date.today()}, torch.bfloat16. Medians.\n\n{body}")
    print(f"\n{text}\n")
    if args.markdown:
        write_marked_section(args.markdown, merge_subsections(read_marked_section(args.markdown, "bench_ops"), text),
                             "bench_ops")
    return text


if __name__ == "__main__":
    main()
