"""Causal-LM training on rows packed by `mhla_nlp.prepare_data` (MHLA, fla's GLA, or Llama as Transformer++).

    python -m mhla_nlp.train --config mhla_nlp/configs/mhla_340M.yaml --data data/packed --output runs/mhla_340M
    torchrun --nproc_per_node 8 -m mhla_nlp.train --config mhla_nlp/configs/mhla_340M.yaml --data ...

AdamW (0.9, 0.95), cosine schedule with a minimum-lr ratio and linear warmup, gradient clipping, the
mixing constraint after every optimiser step. MHLA and GLA take each micro-batch as one packed sequence
with `cu_seqlens` from the rows' document offsets (documents never see each other); Llama takes [B, T]
rows with per-document positions (SDPA attends across the documents of a row, as usual for packed
training). In every case the next-token target across a document boundary is ignored. Rows come from
per-epoch permutations seeded by (seed, epoch), indexed by the step, so `--resume` replays exactly the same
batches. The run folder, checkpoints, precision, accumulation and tracking are `mhla_core.training`'s.

`final/` is a library folder: `save_pretrained` of the model plus the tokenizer (`--tokenizer`, else the one
`prepare_data` recorded for `--data`), so `transformers.pipeline("text-generation", model=<run>/final)` works.
`--init-from DIR` starts from the weights of a `save_pretrained` folder (`from_pretrained`) whose config builds
the same architecture as `--model` / `--model-kwargs`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mhla_core import training
from mhla_core.checkpoint import unwrap
from mhla_core.config import ParseKwargs, parse_with_config
from mhla_core.training import nonnegative_int, positive_int
from mhla_nlp.packing import make_batch
from mhla_nlp.zoo import DEFAULTS, MODELS, build_model, freeze_linear_mixing  # noqa: F401  (imported from here)


def build_parser() -> argparse.ArgumentParser:
    p = training.make_parser(__doc__.split("\n")[0])
    a = p.add_argument
    a("--model", default="mhla", choices=MODELS, help="linear: MHLA with all mixing weights fixed to 1")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="config overrides, e.g. hidden_size=256")
    a("--data", required=False, help="dataset directory written by mhla_nlp.prepare_data")
    a("--train-split", default="train")
    a("--val-split", default="validation")
    a("--batch-size", type=positive_int, default=16, help="rows per device per micro-batch")
    a("--lr", type=float, default=3e-4)
    a("--min-lr-ratio", type=float, default=0.1)
    a("--warmup-steps", type=nonnegative_int, default=1024)
    a("--max-steps", type=positive_int, default=20480)
    a("--weight-decay", type=float, default=0.01)
    a("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--clip-grad", type=float, default=1.0)
    a("--stop-at", type=nonnegative_int, default=0, help="stop (with a checkpoint) at this step; the schedule "
      "spans max_steps")
    a("--eval-every", type=nonnegative_int, default=0, help="validation loss every N steps (0: at the end only)")
    a("--eval-batches", type=positive_int, default=50)
    a("--tokenizer", default=None, help="tokenizer folder saved into final/ (default: the one prepare_data "
      "recorded for --data)")
    a("--init-from", default=None, metavar="DIR", help="start from the weights of a save_pretrained folder "
      "(e.g. another run's final/) of the same architecture; ignored with --resume")
    training.add_training_args(p, seed=42, checkpoint_every=1000, log_interval=10, grad_checkpointing=False)
    return p


@torch.no_grad()
def evaluate(model, ds, args, device, max_batches: int) -> dict:
    """Mean next-token loss and perplexity over the first rows of `ds` (boundary targets ignored)."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, min(len(ds), max_batches * args.batch_size), args.batch_size):
        chunk = ds[b: b + args.batch_size]
        batch = make_batch(chunk["input_ids"], chunk["cu_seqlens"], args.model, device)
        n = int((batch["labels"][..., 1:] != -100).sum())
        loss = model(**batch, use_cache=False).loss
        total += float(loss) * n
        count += n
    model.train()
    mean = total / max(count, 1)
    return dict(val_loss=round(mean, 5), val_ppl=round(math.exp(min(mean, 50)), 3))


def load_packed(args: argparse.Namespace, vocab_size: int):
    """(train, validation or None) rows of `--data`; clear errors for a folder that is not prepare_data's
    output and for a model vocabulary smaller than the tokenizer's."""
    import datasets

    root = Path(args.data or "")
    if not args.data or not root.is_dir() or not any((root / f).is_file() for f in
                                                      ("dataset_dict.json", "state.json", "mhla_prepare.json")):
        raise SystemExit(f"--data {args.data}: not a dataset directory; write one with python -m mhla_nlp.prepare_data")
    meta = json.loads((root / "mhla_prepare.json").read_text()) if (root / "mhla_prepare.json").is_file() else {}
    if meta.get("vocab_size", 0) > vocab_size:
        raise ValueError(f"--model-kwargs vocab_size={vocab_size} is below the tokenizer's {meta['vocab_size']} "
                         f"tokens ({meta.get('tokenizer')}); pass vocab_size={meta['vocab_size']} or more")
    data = datasets.load_from_disk(str(root))
    train_ds = data[args.train_split] if isinstance(data, datasets.DatasetDict) else data
    return train_ds, (data[args.val_split] if isinstance(data, datasets.DatasetDict) and args.val_split in data
                      else None)


# config fields that leave what the weights compute unchanged: token ids, initialisation, cache, fused kernels,
# training-only settings, the auto_map of a saved MHLA config
NOT_ARCHITECTURE = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
                              "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy",
                              "use_l2warp", "mixing_clamp", "attention_dropout", "auto_map"})


def model_fields(config: Any) -> dict[str, Any]:
    """The model config a resume must match (`training.config_fields` without the saved-folder `auto_map`)."""
    return {k: v for k, v in training.config_fields(config.to_dict()).items() if k != "auto_map"}


def architecture(config: Any) -> dict[str, Any]:
    """The fields of a transformers config that decide what its model computes (its own fields, not the
    generic PretrainedConfig ones, less NOT_ARCHITECTURE); tuples as lists."""
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_fields(config).items()
            if k not in generic and k not in NOT_ARCHITECTURE}


def init_from_pretrained(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """`type(model).from_pretrained(path)` with `model`'s config (--init-from); ValueError when the folder holds
    another model type or its config differs from `model`'s in architecture (naming the fields and the
    --model-kwargs that would match), or when weights are missing or left over."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--init-from {path}: no config.json there; pass a save_pretrained folder such as "
                         "<run>/final")
    ours = model.config
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind != ours.model_type:
        raise ValueError(f"--init-from {path} holds a {kind!r} model, but --model {name} builds {ours.model_type!r}")
    theirs = architecture(type(ours).from_pretrained(folder))  # the class defaults fill fields the file leaves out
    mine = architecture(ours)
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if diff:
        shown = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff)
        fix = " ".join(f"{k}={theirs[k]}" for k in diff if k in theirs)
        raise ValueError(f"--init-from {path}: its config differs in architecture from --model {name} with these "
                         f"--model-kwargs ({shown}); pass --model-kwargs {fix}")
    loaded, info = type(model).from_pretrained(folder, config=ours, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"--init-from {path}: the weights do not fit the model: {bad}")
    return freeze_linear_mixing(loaded) if name == "linear" else loaded


def load_tokenizer(args: argparse.Namespace, vocab_size: int):
    """--tokenizer, else the tokenizer prepare_data recorded for --data; None (with a note) when that one does
    not load. ValueError for a --tokenizer that does not load or has more tokens than the model."""
    from transformers import AutoTokenizer

    if args.tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:
            raise ValueError(f"--tokenizer {args.tokenizer}: not a tokenizer folder ({e})") from e
        if len(tok) > vocab_size:
            raise ValueError(f"--tokenizer {args.tokenizer} has {len(tok)} tokens, more than --model-kwargs "
                             f"vocab_size={vocab_size}; pass vocab_size={len(tok)} or more")
        return tok
    meta = Path(args.data) / "mhla_prepare.json"
    recorded = json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None
    if recorded:
        try:
            return AutoTokenizer.from_pretrained(recorded)
        except (OSError, ValueError):
            pass
    print(f"note: no tokenizer for final/ (--data {args.data} names {recorded!r}, which does not load); "
          "pass --tokenizer DIR", flush=True)
    return None


def save_final(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """`save_pretrained` of the model and (when known) the tokenizer into `folder`; the generation config
    takes the tokenizer's bos/eos/pad ids, so that `generate` stops at its eos."""
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if (tid := getattr(tokenizer, key, None)) is not None:
                setattr(model.generation_config, key, tid)
        tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def run(args: argparse.Namespace) -> dict:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    acc = training.make_accelerator(args)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.model_kwargs)
    if args.init_from and not args.resume:
        model = init_from_pretrained(model, args.init_from, args.model)
        if acc.is_main_process:
            print(f"weights from --init-from {args.init_from}", flush=True)
    model = model.to(device)
    train_ds, val_ds = load_packed(args, model.config.vocab_size)
    tokenizer = load_tokenizer(args, model.config.vocab_size)
    seq_len = len(train_ds[0]["input_ids"])
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    training.constrain(model)
    # as HF Trainer: no decay on biases and norm weights (1-D); matrices, embeddings and the mixing decay
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr,
                                  betas=tuple(args.betas), fused=device.type == "cuda")
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps,
                                                           min_lr_rate=args.min_lr_ratio)
    per_step = args.batch_size * args.grad_accum_steps * world
    out = training.run_folder(args, args.model)
    frozen = {"model": args.model, "model_config": model_fields(model.config),
              "rows_per_step": per_step}
    r = training.start_run(args, acc, out=out, project="mhla-nlp",
                           config={**vars(args), "seq_len": seq_len, "world": world}, frozen=frozen)
    if r.main:
        unwrap(model).config.save_pretrained(out)
    step = r.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    model, optimizer = r.prepare(model, optimizer)
    tokens_per_step = per_step * seq_len
    if r.main:
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params / 1e6:.2f}M params, {len(train_ds)} rows of {seq_len}, "
              f"{tokens_per_step} tokens/step, {args.max_steps} steps "
              f"({args.max_steps * tokens_per_step / 1e9:.3f}B tokens), device {device}, world {world}", flush=True)

    def loss_fn(micro: int) -> dict[str, torch.Tensor]:
        first = step * per_step + (micro * world + rank) * args.batch_size
        chunk = train_ds[training.sample_indices(first, args.batch_size, len(train_ds), args.seed)]
        batch = make_batch(chunk["input_ids"], chunk["cu_seqlens"], args.model, device)
        return {"loss": model(**batch, use_cache=False).loss}

    metrics: dict = {}
    model.train()
    stop = min(args.stop_at, args.max_steps) if args.stop_at else args.max_steps
    while step < stop:
        training.seed_step(args.seed, step, rank)
        stats = training.train_step(r, model, optimizer, range(args.grad_accum_steps), loss_fn,
                                    clip_grad=args.clip_grad)
        scheduler.step()
        training.constrain(model)
        step += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            rate, eta = r.pace(step, args.max_steps, tokens_per_step)
            metrics = dict(step=step, loss=round(stats["loss"].item(), 5), lr=optimizer.param_groups[0]["lr"],
                           grad_norm=round(float(stats["grad_norm"]), 4) if "grad_norm" in stats else None,
                           tokens=step * tokens_per_step, tok_per_s=round(rate, 1), eta_min=eta)
            r.log(metrics, step)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            r.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
        if val_ds is not None and args.eval_every and step % args.eval_every == 0 and step < args.max_steps and r.main:
            with acc.autocast():
                r.log({"step": step, **evaluate(unwrap(model), val_ds, args, device, args.eval_batches)}, step, False)
    r.save(step, model=model, optimizer=optimizer, scheduler=scheduler)
    if r.main and step == args.max_steps:
        save_final(unwrap(model), tokenizer, out / "final")
    if r.main and val_ds is not None:
        with acc.autocast():
            metrics.update(evaluate(unwrap(model), val_ds, args, device, args.eval_batches))
        r.log({"step": step, "final": True, **metrics}, step, check=False)
    r.finish()
    return {**metrics, "step": step, "model": unwrap(model)}


_constrain = training.constrain  # the name scripts/bench_lm.py imports


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
