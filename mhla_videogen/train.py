"""Flow-matching fine-tuning of an MHLA Wan transformer on precomputed latents and text embeddings.

    python -m mhla_videogen.train --config mhla_videogen/configs/wan_hybrid.yaml \\
        --init-wan WAN_DIFFUSERS_DIR/transformer --data LATENT_DIR --output runs/wan_hybrid
    torchrun --nproc_per_node 8 -m mhla_videogen.train --config ... (DDP)
    torchrun --nproc_per_node 8 -m mhla_videogen.train --config ... --fsdp (FSDP2: sharded weights and optimizer)

The model is `--init-mhla DIR` (an MHLA model folder) or built from the softmax `--init-wan DIR` with
`--layers hybrid|full` (`from_wan`: every Wan weight reused, MHLA parameters from `--mixing-init`).
LATENT_DIR comes from `python -m mhla_videogen.extract`; the objective is `mhla_videogen.objective`'s.
AdamW (lr 2e-5, eps 1e-10, wd 0), constant after `--warmup-steps` linear warm-up, gradient clipping 0.1, bf16
autocast on CUDA, gradient checkpointing, caption dropout 0.1 to the empty-prompt embedding.

The run folder, checkpoints (`last/{model,ema}.safetensors`, `last/state.pt`), exact `--resume`, precision,
accumulation and tracking are `mhla_core.training`'s; `{output}/final/` is a model folder for
`python -m mhla_videogen.generate --transformer` (`final_ema/` too with `--ema-decay`). `--fsdp` (world > 1)
shards with FSDP2 (`mhla_videogen.fsdp`) instead of DDP; checkpoints stay full, so either path resumes the other's.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mhla_core import training
from mhla_core.checkpoint import unwrap
from mhla_core.config import parse_with_config
from mhla_core.training import positive_int
from mhla_core.training.ema import full_tensor
from mhla_videogen.data import VideoLatentDataset
from mhla_videogen.fsdp import full_state, param_names, restore, shard_model
from mhla_videogen.objective import make_batch


def build_parser() -> argparse.ArgumentParser:
    p = training.make_parser(__doc__, prog="python -m mhla_videogen.train")
    a = p.add_argument
    a("--data", default=None, help="folder from python -m mhla_videogen.extract")
    a("--init-wan", default=None, help="softmax Wan transformer folder (converted with from_wan)")
    a("--init-mhla", default=None, help="MHLA transformer folder (continue fine-tuning)")
    a("--layers", default="hybrid", choices=["hybrid", "full"], help="which layers get MHLA (with --init-wan)")
    a("--block-layout", type=positive_int, nargs=3, default=[3, 5, 10])
    a("--gated", action="store_true", help="add the output gate (the authors' committed code trains ungated)")
    a("--mixing-init", default="distance", choices=["distance", "reference"])
    a("--train-params", default="all", choices=["all", "mhla"], help="all parameters, or only the MHLA layers'")
    a("--mixing-constraint", default="none", choices=["none", "clamp01"], help="none (the authors) or clamp01")
    a("--batch-size", type=positive_int, default=4, help="per process and micro-batch")
    a("--max-steps", type=positive_int, default=10000)
    a("--lr", type=float, default=2e-5)
    a("--adam-eps", type=float, default=1e-10)
    a("--adam-betas", type=float, nargs=2, default=[0.9, 0.999])
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=1000)
    a("--clip-grad", type=float, default=0.1)
    a("--flow-shift", type=float, default=3.0)
    a("--logit-mean", type=float, default=0.0)
    a("--logit-std", type=float, default=1.0)
    a("--caption-dropout", type=float, default=0.1)
    a("--max-sequence-length", type=positive_int, default=512, help="text embeddings are zero-padded to this length")
    a("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (e.g. 0.9999); 0 = off")
    a("--fsdp", action="store_true",
      help="under torchrun (world > 1): shard weights, gradients, optimizer state and EMA with FSDP2 instead of "
           "DDP; on CUDA the gathered weights are in --amp-dtype (fp32 with --amp-dtype none) and gradients are "
           "reduced in fp32. Ignored, with a notice, in a single process")
    training.add_training_args(p, output="runs/wan_mhla", checkpoint_every=500, log_interval=10,
                               grad_checkpointing=True)
    return p


def build_model(args) -> nn.Module:
    from mhla_videogen.model import MHLAWanTransformer3DModel

    if bool(args.init_wan) == bool(args.init_mhla):
        raise SystemExit("give exactly one of --init-wan (softmax Wan folder) or --init-mhla (MHLA folder)")
    if args.init_mhla:
        if not (Path(args.init_mhla) / "config.json").is_file():
            raise SystemExit(f"--init-mhla {args.init_mhla} is not an MHLA model folder (config.json missing)")
        return MHLAWanTransformer3DModel.from_pretrained(args.init_mhla, local_files_only=True, dtype=torch.float32)
    from mhla_videogen.convert import from_wan

    if not (Path(args.init_wan) / "config.json").is_file():
        raise SystemExit(f"--init-wan {args.init_wan} is not a local transformer folder (config.json missing); "
                         "fetch Wan-AI/Wan2.1-T2V-1.3B-Diffusers and pass its transformer/ folder")
    return from_wan(args.init_wan, layers=args.layers, gated=args.gated, mixing_init=args.mixing_init,
                    block_layout=tuple(args.block_layout), torch_dtype=torch.float32)


def select_trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """`all`, or `mhla`: every parameter of the MHLA attention modules (q/k/v/o, norms, g, g_norm, W)."""
    if which == "all":
        return [p for p in model.parameters()]
    keep = {id(p) for attn in model.mhla_attentions.values() for p in attn.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


def run(args: argparse.Namespace) -> dict:
    if args.data is None:
        raise SystemExit("--data (a folder from python -m mhla_videogen.extract) is required")
    acc = training.make_accelerator(args)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    fsdp = args.fsdp and world > 1
    if args.fsdp and not fsdp:
        print("--fsdp ignored: a single process trains the unsharded model", flush=True)
    if fsdp and args.amp_dtype == "float16":
        raise SystemExit("--fsdp trains with --amp-dtype bfloat16 or none (no fp16 loss scaling for sharded grads)")
    ds = VideoLatentDataset(args.data)
    empty = ds.empty_text()
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    params = select_trainable(model, args.train_params)
    model_cls, config = type(model), model.config
    if fsdp:  # fully_shard swaps in sharded (DTensor) parameters: the optimizer takes those
        model = shard_model(model, device, args.amp_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    names = param_names(model, params)
    ema = training.EMA(model, args.ema_decay) if args.ema_decay else None
    r = training.start_run(args, acc, out=Path(args.output), project="mhla-videogen", config=vars(args),
                           frozen={"model_config": training.config_fields(config), "train_params": args.train_params,
                                   "clips_per_step": args.batch_size * args.grad_accum_steps * world})
    step = restore(r.resume, model, optimizer, ema, names, fsdp) if r.resume else 0
    if not fsdp:
        model, optimizer = r.prepare(model, optimizer)
    mixing = ([a.block_attn.conv.weight for a in unwrap(model).mhla_attentions.values()]
              if args.mixing_constraint == "clamp01" else [])
    total = args.max_steps
    if r.main:
        n_all, n_train = sum(p.numel() for p in unwrap(model).parameters()), sum(p.numel() for p in params)
        print(f"MHLA Wan ({config.mhla_layers} MHLA layers): {n_all / 1e6:.1f}M params, {n_train / 1e6:.1f}M trained, "
              f"{len(ds)} clips, {total} steps x {args.batch_size} x {world}, device {device}"
              + (", FSDP" if fsdp else ""), flush=True)

    def loss_fn(micro: int) -> dict[str, torch.Tensor]:
        x_t, t, text, target = (v.to(device, non_blocking=True)
                                for v in make_batch(ds, empty, step, args, rank, world, micro))
        pred = model(hidden_states=x_t, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        return {"loss": F.mse_loss(pred.float(), target)}

    def checkpoint() -> dict:
        weights, optim = full_state(model, optimizer, ema, fsdp)
        r.write(step, weights, {"optimizer": optim})
        return weights

    metrics: dict = {}
    model.train()
    while step < total:
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = training.train_step(r, model, optimizer, range(args.grad_accum_steps), loss_fn,
                                    clip_grad=args.clip_grad, params=params)
        training.constrain(model, clamp01=mixing)
        if ema is not None:
            ema.update(model)
        step += 1
        if step % args.log_interval == 0 or step == total:
            loss = stats["loss"].clone()
            if world > 1:  # every rank takes part; rank 0 logs the mean over ranks
                torch.distributed.all_reduce(loss)
            rate, eta = r.pace(step, total)
            grad_norm = float(full_tensor(stats["grad_norm"])) if "grad_norm" in stats else 0.0
            metrics = dict(step=step, loss=round(loss.item() / world, 6), grad_norm=round(grad_norm, 4), lr=lr,
                           steps_per_s=round(rate, 4), clips_per_s=round(rate * args.batch_size * world, 3),
                           eta_min=eta)
            r.log(metrics, step)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint()
    weights = checkpoint()
    final = unwrap(model)
    if r.main:
        if fsdp:  # save from an unsharded copy of the model (rank 0 only)
            final = model_cls.from_config(config)
            final.load_state_dict(weights["model"], assign=True)
        final.save_pretrained(Path(args.output) / "final")
        if ema is not None:  # final_ema/: the same model with the EMA weights
            ema_model = model_cls.from_config(config)
            ema_model.load_state_dict({**final.state_dict(), **weights["ema"]})
            ema_model.save_pretrained(Path(args.output) / "final_ema")
    r.finish()
    return {**metrics, "step": step, "model": final}  # under FSDP: rank 0's unsharded copy


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise SystemExit(f"--lr must be a positive number, got {args.lr}")
    return run(args)


if __name__ == "__main__":
    main()
