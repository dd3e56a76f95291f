"""Causal-LM training on rows packed by `mhla_nlp.prepare_data` (MHLA, fla's GLA, or Llama as Transformer++).

    python -m mhla_nlp.train --config mhla_nlp/configs/mhla_340M.yaml --data data/packed --output runs/mhla_340M
    torchrun --nproc_per_node 8 -m mhla_nlp.train --config mhla_nlp/configs/mhla_340M.yaml --data ...

A plain PyTorch loop (DDP under torchrun, bf16 autocast on CUDA), AdamW (0.9, 0.95), cosine schedule
with a minimum-lr ratio and linear warmup, gradient clipping, `constrain_mixing()` after every
optimiser step. MHLA and GLA take each micro-batch as one packed sequence with `cu_seqlens` from the
rows' document offsets (documents never see each other); Llama takes [B, T] rows with per-document
positions (SDPA attends across the documents of a row, as usual for packed training). In every case
the next-token target across a document boundary is ignored. Data order is a per-epoch permutation
seeded by (seed, epoch), so `--resume` replays exactly the same batches; checkpoints
(`last.safetensors` + `last_state.pt`) are written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mhla_core.checkpoint import load_state, load_weights, save_state, save_weights, unwrap
from mhla_core.config import ParseKwargs, dump_yaml, parse_with_config
from mhla_core.distributed import init_distributed, init_wandb, log_metrics

MODELS = ("mhla", "linear", "gla", "transformer")
# the paper's 340M width and depth; --model-kwargs override any field
DEFAULTS = {
    "mhla": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1, hidden_ratio=4,
                 norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000, chunk_size=64, max_chunks=32),
    "gla": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1, hidden_ratio=4,
                norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000, attn_mode="chunk", use_short_conv=False,
                feature_map=None, use_output_gate=True, fuse_cross_entropy=True),
    "transformer": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                        intermediate_size=2816, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=32000,
                        max_position_embeddings=2048, rope_theta=10000.0, hidden_act="silu",
                        attention_bias=False, mlp_bias=False),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--config", default=None, help="YAML file of defaults for these arguments")
    a("--model", default="mhla", choices=MODELS, help="linear: MHLA with all mixing weights fixed to 1")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="config overrides, e.g. hidden_size=256")
    a("--data", required=False, help="dataset directory written by mhla_nlp.prepare_data")
    a("--train-split", default="train")
    a("--val-split", default="validation")
    a("--output", default=None, help="run directory (default runs/<experiment or model>)")
    a("--experiment", default=None)
    a("--batch-size", type=int, default=16, help="rows per device per micro-batch")
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float, default=3e-4)
    a("--min-lr-ratio", type=float, default=0.1)
    a("--warmup-steps", type=int, default=1024)
    a("--max-steps", type=int, default=20480)
    a("--weight-decay", type=float, default=0.01)
    a("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--clip-grad", type=float, default=1.0)
    a("--seed", type=int, default=42)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16", "none"))
    a("--stop-at", type=int, default=0, help="stop (with a checkpoint) at this step; the schedule spans max_steps")
    a("--resume", action="store_true")
    a("--checkpoint-every", type=int, default=1000)
    a("--log-interval", type=int, default=10)
    a("--eval-every", type=int, default=0, help="validation loss every N steps (0: at the end only)")
    a("--eval-batches", type=int, default=50)
    a("--gradient-checkpointing", action="store_true")
    a("--log-wandb", action="store_true", help="log to wandb (offline without WANDB_API_KEY)")
    return p


def build_model(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A fresh causal LM: `mhla`, `gla` (fla) or `transformer` (transformers' Llama with SDPA)."""
    kw = {**DEFAULTS["mhla" if name == "linear" else name], **(model_kwargs or {})}
    if name in ("mhla", "linear"):
        from mhla_nlp import MHLAConfig, MHLAForCausalLM

        model = MHLAForCausalLM(MHLAConfig(**kw))
        return freeze_linear_mixing(model) if name == "linear" else model
    if name == "gla":
        from fla.models import GLAConfig, GLAForCausalLM

        return GLAForCausalLM(GLAConfig(**kw))
    if name == "transformer":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa"))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def freeze_linear_mixing(model: nn.Module) -> nn.Module:
    """Plain causal linear attention from the MHLA layer: every mixing weight 1 (below the diagonal), frozen.

    Same chunking, kernels, features, rotary and output gate as MHLA; only the learned chunk mixing is gone.
    The saved model is an ordinary MHLA checkpoint (its mixing is the all-ones lower triangle).
    """
    from mhla_nlp.layers.mhla import MHLAAttention

    for m in model.modules():
        if isinstance(m, MHLAAttention):
            with torch.no_grad():
                m.mixing_matrix.copy_(torch.ones_like(m.mixing_matrix).tril())
            m.mixing_matrix.requires_grad_(False)
    return model


def make_batch(rows: list[list[int]], cus: list[list[int]], model_name: str, device) -> dict:
    """Model inputs for a micro-batch of packed rows; labels are -100 where a new document starts."""
    B, T = len(rows), len(rows[0])
    ids = torch.tensor(rows, dtype=torch.long)
    starts = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.empty(B, T, dtype=torch.long)
    for r, cu in enumerate(cus):
        for a, b in zip(cu[:-1], cu[1:]):
            starts[r, a] = True
            pos[r, a:b] = torch.arange(b - a)
    labels = ids.masked_fill(starts, -100)
    if model_name == "transformer":
        return dict(input_ids=ids.to(device), labels=labels.to(device), position_ids=pos.to(device))
    cu = sorted({r * T + o for r, c in enumerate(cus) for o in c})
    return dict(input_ids=ids.view(1, -1).to(device), labels=labels.view(1, -1).to(device),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))


class RowSampler:
    """Rows for (step, micro, rank): an epoch-wise permutation seeded by (seed, epoch); exact on resume."""

    def __init__(self, n: int, per_step: int, seed: int):
        self.n, self.per_step, self.seed, self._cache = n, per_step, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=gen)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for g in range(start, start + count):
            epoch, i = divmod(g, self.n)
            out.append(int(self._perm(epoch)[i]))
        return out








def _constrain(model: nn.Module) -> None:
    m = unwrap(model)
    if hasattr(m, "constrain_mixing"):
        m.constrain_mixing()


@torch.no_grad()
def evaluate(model, ds, args, device, amp, max_batches: int) -> dict:
    """Mean next-token loss and perplexity over the first rows of `ds` (boundary targets ignored)."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, min(len(ds), max_batches * args.batch_size), args.batch_size):
        chunk = ds[b: b + args.batch_size]
        batch = make_batch(chunk["input_ids"], chunk["cu_seqlens"], args.model, device)
        n = int((batch["labels"][..., 1:] != -100).sum())
        with amp:
            loss = model(**batch, use_cache=False).loss
        total += float(loss) * n
        count += n
    model.train()
    mean = total / max(count, 1)
    return dict(val_loss=round(mean, 5), val_ppl=round(math.exp(min(mean, 50)), 3))


def run(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    rank, world, device = init_distributed(args.device)
    main = rank == 0
    if not args.data:
        raise SystemExit("--data: a dataset directory written by mhla_nlp.prepare_data is required")
    data = datasets.load_from_disk(args.data)
    train_ds = data[args.train_split] if isinstance(data, datasets.DatasetDict) else data
    val_ds = data[args.val_split] if isinstance(data, datasets.DatasetDict) and args.val_split in data else None
    seq_len = len(train_ds[0]["input_ids"])
    out = Path(args.output or Path("runs") / (args.experiment or args.model))
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.model_kwargs).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    _constrain(model)
    # as HF Trainer: no decay on biases and norm weights (1-D); matrices, embeddings and the mixing decay
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda")
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps,
                                                           min_lr_rate=args.min_lr_ratio)
    step = 0
    if args.resume:
        if not (out / "last_state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        state = load_state(out / "last_state.pt")
        load_weights(model, out / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = (torch.autocast("cuda", dtype=getattr(torch, args.amp_dtype))
           if device.type == "cuda" and args.amp_dtype != "none" else nullcontext())
    per_step = args.batch_size * args.grad_accum * world
    sampler = RowSampler(len(train_ds), per_step, args.seed)
    tokens_per_step = per_step * seq_len
    log = wandb = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml({**vars(args), "betas": list(args.betas), "seq_len": seq_len, "world": world}, out / "config.yaml")
        unwrap(model).config.save_pretrained(out)
        wandb = init_wandb("mhla-nlp", args.experiment, out, vars(args)) if args.log_wandb else None
        log = open(out / "log.jsonl", "a")
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model}: {n_params / 1e6:.2f}M params, {len(train_ds)} rows of {seq_len}, "
              f"{tokens_per_step} tokens/step, {args.max_steps} steps "
              f"({args.max_steps * tokens_per_step / 1e9:.3f}B tokens), device {device}, world {world}", flush=True)

    def checkpoint():
        if main:
            save_weights(model, out / "last.safetensors")
            save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                       out / "last_state.pt")

    metrics: dict = {}
    model.train()
    t0, start_step = time.time(), step
    stop = min(args.stop_at, args.max_steps) if args.stop_at else args.max_steps
    while step < stop:
        torch.manual_seed(args.seed * 7919 + step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            first = step * per_step + (micro * world + rank) * args.batch_size
            chunk = train_ds[sampler.indices(first, args.batch_size)]
            batch = make_batch(chunk["input_ids"], chunk["cu_seqlens"], args.model, device)
            sync = nullcontext() if world == 1 or micro == args.grad_accum - 1 else model.no_sync()
            with sync:  # forward and backward inside one no_sync (a context manager is single-use)
                with amp:
                    loss = model(**batch, use_cache=False).loss / args.grad_accum
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                loss.backward()
            loss_sum += loss.item()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad) if args.clip_grad else None
        optimizer.step()
        scheduler.step()
        _constrain(model)
        step += 1
        if main and (step % args.log_interval == 0 or step == args.max_steps):
            elapsed = time.time() - t0
            rate = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
            eta = (args.max_steps - step) * tokens_per_step / max(rate, 1e-9)
            metrics = dict(step=step, loss=round(loss_sum, 5), lr=optimizer.param_groups[0]["lr"],
                           grad_norm=round(float(gnorm), 4) if gnorm is not None else None,
                           tokens=step * tokens_per_step, tok_per_s=round(rate, 1), eta_min=round(eta / 60, 1))
            log_metrics(metrics, log, wandb, step)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint()
        if val_ds is not None and args.eval_every and step % args.eval_every == 0 and step < args.max_steps and main:
            ev = evaluate(unwrap(model), val_ds, args, device, amp, args.eval_batches)
            print(json.dumps({"step": step, **ev}), flush=True)
            log.write(json.dumps({"step": step, **ev}) + "\n")
    checkpoint()
    if main and step == args.max_steps:
        unwrap(model).save_pretrained(out / "final")
    if main:
        if val_ds is not None:
            metrics.update(evaluate(unwrap(model), val_ds, args, device, amp, args.eval_batches))
            print(json.dumps({"step": step, **metrics}), flush=True)
            log.write(json.dumps({"step": step, "final": True, **metrics}) + "\n")
        log.close()
        if wandb:
            wandb.finish()
    if world > 1:
        dist.destroy_process_group()
    return {**metrics, "step": step, "model": unwrap(model)}




def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
