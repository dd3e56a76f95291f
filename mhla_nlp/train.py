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
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

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


def run(args: argparse.Namespace) -> dict:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    acc = training.make_accelerator(args)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.model_kwargs).to(device)
    train_ds, val_ds = load_packed(args, model.config.vocab_size)
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
    frozen = {"model": args.model, "model_config": training.config_fields(model.config.to_dict()),
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
        unwrap(model).save_pretrained(out / "final")
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
