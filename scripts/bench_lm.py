"""Training and decoding throughput of the 340M language models: MHLA vs GLA (fla) vs Transformer++ (Llama, SDPA).

    python scripts/bench_lm.py --markdown docs/benchmarks_lm.md     # one H200: about 2 minutes
    python scripts/bench_lm.py --tiny --device cpu                   # CPU smoke run (the test)

Random weights, the paper's width and depth (mhla_nlp.train.DEFAULTS: hidden 1024, 24 layers, vocab 32000).
Training: one full update (bf16 autocast, forward with the loss, backward, fused AdamW step, the mixing clamp
for MHLA) on `--train-batch` rows of `--train-len` tokens; tokens/s = rows x length / median step time.
Decoding: greedy `generate()` with the cache from a `--prompt-len` prompt for `--decode-batch` rows;
decode tokens/s = rows x (n - 1) / (t(n new tokens) - t(1 new token)), so the prefill is excluded.
`--mhla-cache static` decodes MHLA with `generate(cache_implementation="static")`; `--mhla-cache graph` with
`mhla_nlp.generation.static_greedy_generate(cuda_graph=True)` (CUDA), timed as rows x (n - 3) / (t(n) - t(3))
so that the warm-up step and the graph capture are excluded too.
`--tf-cache dynamic static` times Transformer++ decoding twice, with the dynamic cache and with
`generate(cache_implementation="static")`, which transformers compiles (its default `CompileConfig`) on CUDA;
the faster row is the baseline of the decode ratios.
Medians of CUDA-event timings after warm-up (perf_counter on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhla_core.compile import add_compile_args, compile_model, compile_settings  # noqa: E402
from mhla_nlp.generation import static_greedy_generate  # noqa: E402
from mhla_nlp.train import _constrain, build_model  # noqa: E402
from scripts.bench_timing import time_ms  # noqa: E402

TINY = {
    "mhla": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=256, chunk_size=8, max_chunks=8),
    "gla": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=256),
    "transformer": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=256, max_position_embeddings=64),
}
LABELS = {"mhla": "MHLA", "gla": "GLA (fla)", "transformer": "Transformer++ (Llama, SDPA)"}


def bench_train(model, name: str, args, device: torch.device) -> float:
    """Training tokens per second of one full optimizer step."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.train_batch, args.train_len), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()

    def step():
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name == "mhla":
            _constrain(model)

    ms = time_ms(step, device, args.warmup, args.reps)
    return args.train_batch * args.train_len / (ms / 1e3)


@torch.no_grad()
def bench_decode(model, args, device: torch.device, cache: str = "dynamic") -> tuple[float, float]:
    """(decode tokens/s excluding the prefill, prefill + first token ms); `cache`: dynamic, static or graph.
    A static cache is compiled by generate() on CUDA (transformers' auto-compile), not on the CPU."""
    vocab = model.config.vocab_size
    model.eval()
    prompt = torch.randint(3, vocab, (args.decode_batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompt)
    extra = {"cache_implementation": "static"} if cache == "static" else {"use_cache": True}
    if cache == "static" and device.type != "cuda":
        extra["disable_compile"] = True

    def gen(n):
        if cache == "graph":
            return lambda: static_greedy_generate(model, prompt, n, attention_mask=mask, eos_token_id=[],
                                                  cuda_graph=True)
        return lambda: model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, **extra)

    reps = max(1, args.reps // 2)
    base = 3 if cache == "graph" else 1  # graph: the warm-up step and the capture happen within the first 3 tokens
    t1 = time_ms(gen(1), device, 1, reps)
    tb = t1 if base == 1 else time_ms(gen(base), device, 1, reps)
    tn = time_ms(gen(args.new_tokens), device, 1, reps)
    return args.decode_batch * (args.new_tokens - base) / ((tn - tb) / 1e3), t1


def _label(r: dict) -> str:
    if r["model"] != "transformer" or r.get("cache") is None:
        return LABELS[r["model"]]
    return LABELS["transformer"][:-1] + (", static cache, compiled)" if r["cache"] == "static" else ", dynamic cache)")


def markdown(rows: list[dict], info: dict, args) -> str:
    tf = [r for r in rows if r["model"] == "transformer"]
    base = max(tf, key=lambda r: r["decode_tok_s"]) if tf else None  # the faster decode is the baseline
    lines = [
        f"### Language models: training and decoding throughput ({info['card']}, {info['date']})",
        "",
        f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
        f"fla {info['fla']}; `python scripts/bench_lm.py` (compile: {args.compile}). Random weights, "
        f"hidden {rows[0]['hidden']}, "
        f"{rows[0]['layers']} layers, bf16 autocast. Training: {args.train_batch} x {args.train_len} tokens per "
        f"step (forward, loss, backward, AdamW). Decoding: batch {args.decode_batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy with the cache, prefill excluded (MHLA decode steps: "
        f"{_mhla_decode_label(args)}). Ratios against Transformer++ (decode: its faster cache).",
        "",
        "| model | params | train tokens/s | vs Transformer++ | peak train GiB | decode tokens/s | vs Transformer++ "
        "| prefill + 1 token ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tr = f"{r['train_tok_s'] / base['train_tok_s']:.2f}x" if base else "-"
        de = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        lines.append(f"| {_label(r)} | {r['params'] / 1e6:.0f}M | {r['train_tok_s']:,.0f} | {tr} | "
                     f"{r['peak_gib']:.1f} | {r['decode_tok_s']:,.0f} | {de} | {r['prefill_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--models", nargs="+", default=["mhla", "transformer", "gla"], choices=list(LABELS))
    a("--train-batch", type=int, default=16)
    a("--train-len", type=int, default=2048)
    a("--decode-batch", type=int, default=16)
    a("--prompt-len", type=int, default=512)
    a("--new-tokens", type=int, default=128)
    a("--warmup", type=int, default=3)
    a("--reps", type=int, default=10)
    a("--mhla-decode-backend", default=None, choices=["torch", "triton", "auto"],
      help="backend of MHLA's cached decode steps: fused_recurrent_mhla's (default torch) or, with --mhla-cache "
           "static or graph, fused_recurrent_mhla_static's (default auto: Triton on CUDA)")
    a("--mhla-cache", default="dynamic", choices=["dynamic", "static", "graph"],
      help="MHLA decoding: the dynamic cache, generate(cache_implementation='static'), or "
           "static_greedy_generate(cuda_graph=True) (CUDA only)")
    a("--tf-cache", nargs="+", default=["dynamic"], choices=["dynamic", "static"],
      help="Transformer++ decoding: the dynamic cache and/or generate(cache_implementation='static') "
           "(compiled by transformers on CUDA); one row each")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--tiny", action="store_true", help="2-layer width-64 models, short sequences (CPU smoke run)")
    a("--markdown", default=None, help="append the table to this file")
    add_compile_args(p)  # every model compiled the same way; "blocks" compiles the decoder layers
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.mhla_cache == "graph" and device.type != "cuda":
        raise SystemExit("--mhla-cache graph needs --device cuda (CUDA graphs)")
    if args.mhla_decode_backend is None:
        args.mhla_decode_backend = "torch" if args.mhla_cache == "dynamic" else "auto"
    if args.tiny:
        args.train_batch, args.train_len, args.decode_batch = 2, 32, 2
        args.prompt_len, args.new_tokens, args.warmup, args.reps = 16, 24, 1, 3  # 24: t(n) - t(1) above CPU noise
    models = [m for m in args.models if m != "gla" or device.type == "cuda"]
    if len(models) < len(args.models):
        print("gla: skipped (fla's GLA kernels need CUDA)", flush=True)
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, TINY[name] if args.tiny else None).to(device)
        compile_model(model, *compile_settings(args))
        cfg = model.config
        for m in model.modules():
            if hasattr(m, "decode_backend"):
                m.decode_backend = m.static_decode_backend = args.mhla_decode_backend
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        train = bench_train(model, name, args, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        model.zero_grad(set_to_none=True)
        caches = args.tf_cache if name == "transformer" else [args.mhla_cache if name == "mhla" else "dynamic"]
        for cache in caches:
            decode, prefill = bench_decode(model, args, device, cache)
            rows.append(dict(model=name, params=sum(p.numel() for p in model.parameters()), hidden=cfg.hidden_size,
                             layers=cfg.num_hidden_layers, train_tok_s=train, peak_gib=peak, decode_tok_s=decode,
                             prefill_ms=prefill, cache=cache if name == "transformer" else None))
            print(f"{name} ({cache}): train {train:,.0f} tok/s (peak {peak:.1f} GiB), decode {decode:,.0f} tok/s, "
                  f"prefill {prefill:.1f} ms [{time.time() - t0:.0f} s]", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = dict(card=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
                date=datetime.date.today().isoformat(), torch=torch.__version__, triton=_version("triton"),
                transformers=_version("transformers"), fla=_version("fla-core"))
    text = markdown(rows, info, args)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    return rows


def _mhla_decode_label(args) -> str:
    if args.mhla_cache == "dynamic":
        return f"`fused_recurrent_mhla(backend=\"{args.mhla_decode_backend}\")`"
    how = "one CUDA graph per decode step" if args.mhla_cache == "graph" else "generate, static cache"
    return f"`fused_recurrent_mhla_static(backend=\"{args.mhla_decode_backend}\")`, {how}"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
