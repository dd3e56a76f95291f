"""Evaluation: sliding-window perplexity, and lm-eval-harness with the MHLA model registered.

    python -m mhla_nlp.eval ppl --model runs/mhla_340M/final --tokenizer path/to/tokenizer --data text.txt
    python -m mhla_nlp.eval harness --model runs/mhla_340M/final --tokenizer path/to/tokenizer

`ppl` reads a text file (tokenised as one stream, with the tokenizer's bos first), a dataset saved with
`save_to_disk` that has `input_ids` (e.g. rows from `prepare_data`, concatenated in order) or a text
column (documents joined by eos). Windows of `--max-length` tokens (default: the model's length)
advance by `--stride`; each window scores only the tokens the previous window did not score, with
all earlier tokens of the window as context (the usual Hugging Face recipe). Perplexity =
exp(total NLL / scored tokens); the first token is never scored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

HARNESS_TASKS = ("wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,sciq,copa,"
                 "openbookqa")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ppl", "harness"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="directory from save_pretrained (e.g. <run>/final)")
        s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
        s.add_argument("--batch-size", type=int, default=8 if name == "harness" else 1)
        s.add_argument("--output", default=None, help="write the result as JSON here")
    ppl = sub.choices["ppl"]
    ppl.add_argument("--data", required=True, help=".txt file or a dataset directory (save_to_disk)")
    ppl.add_argument("--split", default="validation")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--max-length", type=int, default=0, help="window length (0: the model's maximum)")
    ppl.add_argument("--stride", type=int, default=0, help="window step (0: max_length // 2)")
    ppl.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0: all)")
    h = sub.choices["harness"]
    h.add_argument("--tasks", default=HARNESS_TASKS)
    h.add_argument("--num-fewshot", type=int, default=0)
    h.add_argument("--limit", type=float, default=None)
    h.add_argument("--include-path", default=None,
                   help="folder of extra lm-eval task YAMLs (local or custom tasks), as lm-eval's --include_path")
    return p


def load_model(path: str, device: str = "cpu", dtype: str = "float32"):
    import fla  # noqa: F401  (registers GLA and fla's other models with the Auto classes)
    from transformers import AutoModelForCausalLM

    import mhla_nlp  # noqa: F401  (registers MHLA)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def model_max_length(model) -> int:
    cfg = model.config
    if getattr(cfg, "model_type", None) == "mhla":
        return cfg.chunk_size * cfg.max_chunks
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def load_tokens(data: str, tokenizer=None, split: str = "validation", text_field: str = "text") -> list[int]:
    src = Path(data)
    if src.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if "input_ids" in ds.column_names:
            return [t for row in ds["input_ids"] for t in row]
        texts = ds[text_field]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [t for tx in texts for t in bos + tokenizer(tx, add_special_tokens=False)["input_ids"] + eos]
    if not src.is_file():
        raise SystemExit(f"--data {src} does not exist")
    ids = tokenizer(src.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def sliding_window_nll(model, tokens: Sequence[int], max_length: int, stride: int, device="cpu",
                       progress: bool = False) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) over `tokens` with windows of max_length every stride."""
    if stride <= 0 or stride > max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    n, total, count, prev_end, begin, windows = len(tokens), 0.0, 0, 0, 0, 0
    t0 = time.time()
    while prev_end < n:
        end = min(begin + max_length, n)
        window = ids[begin:end].unsqueeze(0)
        logits = model(input_ids=window, use_cache=False).logits[0].float()
        # predictions for positions begin+1 .. end-1 come from logits 0 .. end-begin-2
        first = max(prev_end, begin + 1)
        if first < end:
            lp = torch.log_softmax(logits[first - begin - 1: end - begin - 1], dim=-1)
            tgt = ids[first:end]
            total -= float(lp.gather(1, tgt[:, None]).sum())
            count += end - first
        prev_end = end
        begin += stride
        windows += 1
        if progress and (windows % 50 == 0 or end == n):
            rate = count / max(time.time() - t0, 1e-9)
            print(json.dumps(dict(scored=count, of=n - 1, ppl=round(math.exp(total / max(count, 1)), 3),
                                  tok_per_s=round(rate, 1), eta_min=round((n - end) / max(rate, 1e-9) / 60, 1))),
                  flush=True)
    return total, count


def run_ppl(args) -> dict:
    from transformers import AutoTokenizer

    model = load_model(args.model, args.device, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tokens = load_tokens(args.data, tokenizer, args.split, args.text_field)
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    max_length = args.max_length or model_max_length(model)
    stride = args.stride or max(1, max_length // 2)
    print(f"{args.model}: {len(tokens)} tokens, windows of {max_length} every {stride}", flush=True)
    total, count = sliding_window_nll(model, tokens, max_length, stride, args.device, progress=True)
    result = dict(model=args.model, data=args.data, tokens=len(tokens), scored=count, max_length=max_length,
                  stride=stride, nll=total / max(count, 1), ppl=math.exp(total / max(count, 1)))
    print(json.dumps(result), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


def register_harness_model():
    """Register `mhla` with lm-eval-harness (an HFLM that imports mhla_nlp/fla first); lazy import."""
    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("eval harness needs lm-eval-harness: pip install lm-eval  (tested API: lm-eval 0.4.x)")
    import fla  # noqa: F401
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.huggingface import HFLM

    import mhla_nlp  # noqa: F401

    if "mhla" not in MODEL_REGISTRY:
        register_model("mhla")(type("MHLALM", (HFLM,), {}))
    return "mhla"


def run_harness(args) -> dict:
    name = register_harness_model()
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={args.model},tokenizer={args.tokenizer or args.model},dtype={args.dtype}"
    res = lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=args.tasks.split(","),
                                  num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                                  limit=args.limit, task_manager=TaskManager(include_path=args.include_path))
    table = {task: {k: v for k, v in m.items() if isinstance(v, (int, float))} for task, m in res["results"].items()}
    print(json.dumps(table, indent=1), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(table, indent=1))
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_ppl(args) if args.cmd == "ppl" else run_harness(args)


if __name__ == "__main__":
    main()
