"""Host-side cost of one cached decode step: dispatched ATen ops and host milliseconds, MHLA vs Transformer++.

    python scripts/decode_ops.py                       # table on stdout (CPU, seconds)
    python scripts/decode_ops.py --markdown docs/benchmarks.md

At batch 16 a 340M model's decode step on an H200 is bound by the host issuing kernels, not by the GPU, so the
number of ops each step dispatches is a device-independent proxy for decode speed there. The models keep the
paper's depth, heads and chunking (24 layers, 4 heads, chunks of 64) but a tiny width, so the host ms measured
on the CPU are mostly per-op overhead. Every op that reaches a kernel backend is counted (views included), once
per decode step after a `--prompt-len` prefill, with a `TorchDispatchMode`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_nlp.train import build_model  # noqa: E402
from scripts.bench_timing import time_ms  # noqa: E402
from scripts.doc_sections import write_marked_section  # noqa: E402

LABELS = {"mhla": "MHLA", "transformer": "Transformer++ (Llama, SDPA)"}


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched to a backend while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_kwargs(name: str, layers: int, width: int, vocab: int) -> dict:
    """Model overrides: the paper's depth and heads at a small width."""
    if name == "mhla":
        return dict(hidden_size=width, num_hidden_layers=layers, num_heads=4, vocab_size=vocab)
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=4 * width, vocab_size=vocab)


@torch.no_grad()
def measure(name: str, args) -> dict:
    """Ops and host ms of one cached decode step of `args.batch` rows after a prefill of `args.prompt_len`."""
    torch.manual_seed(0)
    model = build_model(name, tiny_kwargs(name, args.layers, args.width, args.vocab)).eval()
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len))
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step():
        return model(input_ids=nxt, past_key_values=cache, use_cache=True)

    # each call appends one token to the cache; 3 + 20 + 1 steps stay far inside both models' lengths
    with _OpCounter() as counter:
        step()
    ms = time_ms(step, torch.device("cpu"), args.warmup, args.reps)
    return {"model": name, "ops": counter.count, "ops_per_layer": counter.count / args.layers, "ms": ms}


def markdown(rows: list[dict], args) -> str:
    """The table with its provenance."""
    lines = [
        f"Host cost of one cached decode step (`python scripts/decode_ops.py`), {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}: {args.layers} layers, "
        f"4 heads, width {args.width}, batch {args.batch}, after a {args.prompt_len}-token prefill, CPU.",
        "",
        "| model | ops per step | ops per layer | host ms per step |",
        "|---|---|---|---|",
    ]
    lines += [f"| {LABELS[r['model']]} | {r['ops']} | {r['ops_per_layer']:.1f} | {r['ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--markdown", type=Path, help="write the table into this file between its markers")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.width % 8:
        raise SystemExit(f"--width must be a multiple of 8 (4 heads, even rotary dims), got {args.width}")
    rows = []
    for name in args.models:
        rows.append(measure(name, args))
        print(f"{name}: {rows[-1]['ops']} ops, {rows[-1]['ms']:.2f} ms", flush=True)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        write_marked_section(args.markdown, table, "decode_ops")
    return rows


if __name__ == "__main__":
    main()
