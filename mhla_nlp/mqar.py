"""MQAR (multi-query associative recall, Zoology): MHLA vs linear attention vs softmax vs GLA, 2-layer models.

    python -m mhla_nlp.mqar --out runs/mqar --jobs 8   # full sweep, 96 runs (one H200: ~20 min)
    python -m mhla_nlp.mqar --out runs/mqar --seq-lens 64 128 --lrs 1e-2 --max-steps 300
    python -m mhla_nlp.mqar --out runs/mqar --from-results a/results.jsonl b/results.jsonl  # merge
    python -m mhla_nlp.mqar --tiny --out /tmp/mqar     # seconds on CPU (tests)

The generator follows Zoology's `_mqar` (zoology/data/associative_recall.py): per example,
`num_kv_pairs` distinct keys drawn from [1, V/2) and distinct values from [V/2, V), written as
k1 v1 k2 v2 ... at the start; every key is then queried once, at position
context + 2 * gap where the gaps are drawn without replacement from range((T - context) // 2) with
p(i) proportional to a * (i + 1) ** (a - 1) (power law, a = 0.01); the label at a query position is
its value, every other label is -100; the remaining zeros become uniform random tokens. Train data
uses `seed`, test data `seed + 10`, as in Zoology. The numpy calls are made in Zoology's order on a
`RandomState(seed)`, so keys, values and gaps equal Zoology's for the same seed; the filler tokens
come from a seeded torch generator (Zoology uses torch's global RNG).

Models: Zoology's 2-layer frame (`mhla_nlp.mqar_model`): embeddings, a gated short convolution
(layer 0), the mixer under test (layer 1), no MLP, tied output head; matched width d_model, 2 heads.
Mixers: `mhla` (MHLAAttention, chunk size T / 16 = 16 chunks, one learned mixing matrix), `linear`
(the same layer with every mixing weight fixed to 1), `softmax` (causal SDPA attention), `gla`
(fla's GatedLinearAttention; CUDA only, skipped with a message on CPU). Each (model, d_model, T) is
trained from scratch on its own data with kv pairs = T / 16 and scored by accuracy over the
labelled positions of the test set; the best learning rate of `--lrs` (Zoology sweeps 1e-3 to
3e-2) is reported. `--jobs N` trains N runs at once in worker processes (small models leave a
GPU mostly idle, so runs in parallel share it well). Outputs in `--out`: results.jsonl, best.json,
table.md, mqar.svg.

Only T / 16 positions carry a label, so the loss and the accuracy run the backbone
(`model.hidden`) and apply `lm_head` at the labelled positions only (`labelled_logits`); this is the
same mean cross entropy as the full-vocabulary logits with ignore_index -100, without the
[B, T, V] logits. `--mhla-backend` (default `torch`) picks the MHLA kernels of the mhla / linear
models: the vectorised PyTorch chunks have no compile step, while `triton` / `auto` (Triton on
CUDA) compile each new (chunk size, head dim) first. `--max-steps` caps the optimizer steps of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mhla_nlp.mqar_model import MHLA_BACKENDS, MIXERS, build_mqar_model

MODELS = MIXERS


def mqar_data(vocab_size: int, num_examples: int, seq_len: int, num_kv_pairs: int, seed: int,
              power_a: float = 0.01, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [num_examples, seq_len] as Zoology's `_mqar` builds them (see the module docstring)."""
    if seq_len % 2 or vocab_size <= seq_len or num_kv_pairs * 4 > seq_len:
        raise ValueError(f"need an even seq_len < vocab_size and 4 * num_kv_pairs <= seq_len "
                         f"(got T={seq_len}, V={vocab_size}, kv={num_kv_pairs})")
    rs = np.random.RandomState(seed)
    n, ctx = num_examples, 2 * num_kv_pairs
    half = vocab_size // 2
    keys = np.stack([rs.choice(np.arange(1, half), replace=False, size=num_kv_pairs) for _ in range(n)])
    values = np.stack([rs.choice(np.arange(half, vocab_size), replace=False, size=num_kv_pairs) for _ in range(n)])
    kvs = np.zeros((n, ctx), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (seq_len - ctx) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([rs.choice(np.arange(space), replace=False, p=p, size=num_kv_pairs) for _ in range(n)])
    queries = np.zeros((n, seq_len - ctx + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((n, seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + ctx + 1, values, axis=1)
    inputs, labels = torch.from_numpy(examples[:, :-1]).clone(), torch.from_numpy(labels[:, 1:]).clone()
    if random_non_queries:
        fill = torch.randint(vocab_size, inputs.shape, generator=torch.Generator().manual_seed(seed))
        inputs = torch.where(inputs == 0, fill, inputs)
    return inputs, labels


def resolved_backend(name: str, mhla_backend: str, device: torch.device) -> str:
    """The attention implementation a run uses: MHLA's resolved kernel backend, else the library's."""
    if name in ("mhla", "linear"):
        from mhla_core.ops.causal import chunk_mhla_triton
        from mhla_core.ops.utils import resolve_backend

        return resolve_backend(mhla_backend, device, chunk_mhla_triton is not None)
    return {"softmax": "sdpa", "gla": "fla"}[name]


def labelled_logits(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, V], targets [n]) at the n labelled positions (y != -100) of x [B, T].

    Runs the backbone (`model.hidden`) and applies `model.lm_head` only where a label is, instead
    of the [B, T, V] logits.
    """
    hidden = model.hidden(x)
    mask = y != -100
    return model.lm_head(hidden[mask]), y[mask]


def labelled_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the labelled positions (= full-logits CE with ignore_index -100)."""
    logits, targets = labelled_logits(model, x, y)
    return nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def accuracy(model, inputs, labels, batch_size: int, device, amp) -> float:
    model.eval()
    right = total = 0
    for b in range(0, len(inputs), batch_size):
        x, y = inputs[b: b + batch_size].to(device), labels[b: b + batch_size].to(device)
        with amp:
            logits, targets = labelled_logits(model, x, y)
        right += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
    model.train()
    return right / max(total, 1)


_DATA: dict[tuple, tuple] = {}


def task_data(args: argparse.Namespace, seq_len: int) -> tuple:
    """((train inputs, labels), (test inputs, labels)) for `seq_len`, built once per process."""
    key = (args.vocab_size, args.train_examples, args.test_examples, seq_len, args.seed, args.power_a)
    if key not in _DATA:
        kv = max(1, seq_len // 16)
        _DATA[key] = (mqar_data(args.vocab_size, args.train_examples, seq_len, kv, args.seed, args.power_a),
                      mqar_data(args.vocab_size, args.test_examples, seq_len, kv, args.seed + 10, args.power_a))
    return _DATA[key]


def train_one(name: str, d_model: int, seq_len: int, lr: float, args: argparse.Namespace) -> dict:
    """Train one (model, d_model, seq_len, lr) run from scratch; returns its result row."""
    (xtr, ytr), (xte, yte) = task_data(args, seq_len)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_mqar_model(name, d_model, seq_len, args.vocab_size, mhla_backend=args.mhla_backend).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    steps = args.epochs * math.ceil(len(xtr) / args.batch_size)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    gen = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    model.train()
    while step < steps:
        perm = torch.randperm(len(xtr), generator=gen)
        for b in range(0, len(xtr), args.batch_size):
            if step == steps:
                break
            idx = perm[b: b + args.batch_size]
            x, y = xtr[idx].to(device), ytr[idx].to(device)
            with amp:
                loss = labelled_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.constrain_mixing()
            step += 1
    final_loss = loss.item()  # waits for the device
    train_s = time.time() - t0
    acc = accuracy(model, xte, yte, args.batch_size, device, amp)
    return dict(model=name, d_model=d_model, seq_len=seq_len, num_kv_pairs=max(1, seq_len // 16), lr=lr, steps=step,
                loss=round(final_loss, 4), accuracy=round(acc, 4),
                chunk_size=max(1, seq_len // 16) if name in ("mhla", "linear") else None,
                backend=resolved_backend(name, args.mhla_backend, device),
                params=sum(p.numel() for p in model.parameters()), step_ms=round(1000 * train_s / max(step, 1), 1),
                seconds=round(time.time() - t0, 1))


def _train_task(job: tuple) -> dict:
    args, task = job
    torch.set_num_threads(1)
    return train_one(*task, args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--out", required=True)
    a("--models", nargs="+", default=list(MODELS), choices=MODELS)
    a("--d-models", nargs="+", type=int, default=[64, 128, 256])
    a("--seq-lens", nargs="+", type=int, default=[64, 128, 256, 512])
    a("--vocab-size", type=int, default=8192)
    a("--train-examples", type=int, default=20000)
    a("--test-examples", type=int, default=1000)
    a("--epochs", type=int, default=8)
    a("--max-steps", type=int, default=None,
      help="cap on optimizer steps per run (the OneCycle schedule spans min(epochs * batches, max-steps))")
    a("--batch-size", type=int, default=128)
    a("--lrs", nargs="+", type=float, default=[3e-3, 1e-2])
    a("--jobs", type=int, default=1, help="runs trained at once, in worker processes (default 1: in this process)")
    a("--power-a", type=float, default=0.01)
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--mhla-backend", default="torch", choices=MHLA_BACKENDS,
      help="MHLA kernels of the mhla / linear models: torch (vectorised chunks, no compile step; default), "
           "triton (Triton kernels, compiled per chunk size and head dim) or auto (triton on CUDA)")
    a("--from-results", nargs="+", default=None, metavar="JSONL",
      help="train nothing: write best.json, table.md and mqar.svg in --out from earlier results.jsonl files")
    a("--tiny", action="store_true", help="CPU smoke run: d 16, T 32, vocab 64, 64 examples, 2 epochs")
    return p


def write_svg(rows: list[dict], path: Path) -> None:
    """Accuracy vs sequence length, one panel per d_model, one line per model (no plotting dependency)."""
    ds = sorted({r["d_model"] for r in rows})
    Ts = sorted({r["seq_len"] for r in rows})
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    colors = dict(mhla="#d62728", linear="#1f77b4", softmax="#2ca02c", gla="#9467bd")
    W, H, pad = 260, 200, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(ds)}" height="{H + 30}" '
             f'font-family="sans-serif" font-size="11">']
    for i, d in enumerate(ds):
        ox = i * W

        def xy(t, acc, ox=ox):
            fx = Ts.index(t) / max(len(Ts) - 1, 1)
            return ox + pad + fx * (W - 2 * pad), 10 + (1 - acc) * (H - pad)

        parts.append(f'<rect x="{ox + pad}" y="10" width="{W - 2 * pad}" height="{H - pad}" '
                     'fill="none" stroke="#999"/>')
        parts.append(f'<text x="{ox + W / 2}" y="{H + 5}" text-anchor="middle">d_model {d} (x: T = {Ts})</text>')
        for yv in (0, 0.5, 1):
            parts.append(f'<text x="{ox + pad - 4}" y="{xy(Ts[0], yv)[1] + 4}" text-anchor="end">{yv}</text>')
        for m in models:
            pts = [xy(r["seq_len"], r["accuracy"]) for r in sorted(rows, key=lambda r: r["seq_len"])
                   if r["model"] == m and r["d_model"] == d]
            if pts:
                parts.append(f'<polyline fill="none" stroke="{colors[m]}" stroke-width="2" points="'
                             + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
    for j, m in enumerate(models):
        parts.append(f'<text x="{10 + 80 * j}" y="{H + 24}" fill="{colors[m]}">{m}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def write_table(rows: list[dict], path: Path) -> str:
    Ts = sorted({r["seq_len"] for r in rows})
    lines = ["| model | d_model | " + " | ".join(f"T={t} (kv {max(1, t // 16)})" for t in Ts) + " |",
             "|---|---|" + "---|" * len(Ts)]
    for m in MODELS:
        for d in sorted({r["d_model"] for r in rows}):
            accs = {r["seq_len"]: r["accuracy"] for r in rows if r["model"] == m and r["d_model"] == d}
            if accs:
                lines.append(f"| {m} | {d} | " + " | ".join(f"{accs[t]:.3f}" if t in accs else "-" for t in Ts) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def best_rows(runs: list[dict]) -> list[dict]:
    """The best-accuracy run (over learning rates) of each (model, d_model, seq_len), in sweep order.

    Ties go to the smaller learning rate, so the choice does not depend on the order runs finished in.
    """
    best: dict[tuple, dict] = {}
    for r in sorted(runs, key=lambda r: r["lr"]):
        key = (r["model"], r["d_model"], r["seq_len"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["seq_len"], r["d_model"], MODELS.index(r["model"])))


def _run_tasks(args: argparse.Namespace, tasks: list[tuple]):
    """Yield result rows: in this process for --jobs 1, else from a spawn pool as runs finish."""
    if args.jobs <= 1:
        for task in tasks:
            yield train_one(*task, args)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.jobs) as pool:
        yield from pool.imap_unordered(_train_task, [(args, t) for t in tasks])


def run(args: argparse.Namespace) -> list[dict]:
    if args.tiny:
        args.d_models, args.seq_lens, args.vocab_size = [16], [32], 64
        args.train_examples, args.test_examples, args.epochs, args.batch_size = 64, 32, 2, 32
    if args.epochs < 1 or args.train_examples < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError(f"need epochs, train examples and max steps >= 1 (got epochs={args.epochs}, "
                         f"train_examples={args.train_examples}, max_steps={args.max_steps})")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        runs = [json.loads(line) for f in args.from_results for line in Path(f).read_text().splitlines() if line]
        if not runs:
            raise ValueError(f"no runs in {args.from_results}")
        return write_outputs(runs, out)
    models = [m for m in args.models if m != "gla" or device.type == "cuda"]
    if "gla" in args.models and "gla" not in models:
        print("gla: skipped (fla's GLA kernels need CUDA)", flush=True)
    tasks = [(m, d, T, lr) for T in args.seq_lens for d in args.d_models for m in models for lr in args.lrs]
    t0, runs = time.time(), []
    with open(out / "results.jsonl", "w") as log:
        for r in _run_tasks(args, tasks):
            runs.append(r)
            eta = round((time.time() - t0) / len(runs) * (len(tasks) - len(runs)) / 60, 1)
            print(json.dumps({**r, "done": f"{len(runs)}/{len(tasks)}", "eta_min": eta}), flush=True)
            log.write(json.dumps(r) + "\n")
            log.flush()
    rows = write_outputs(runs, out)
    print(f"wrote {out}/table.md, {out}/mqar.svg, {out}/results.jsonl in {(time.time() - t0) / 60:.1f} min", flush=True)
    return rows


def write_outputs(runs: list[dict], out: Path) -> list[dict]:
    """best.json, table.md and mqar.svg in `out` from the runs; returns the best row per setting."""
    rows = best_rows(runs)
    (out / "best.json").write_text(json.dumps(rows, indent=1))
    print(write_table(rows, out / "table.md"), flush=True)
    write_svg(rows, out / "mqar.svg")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
