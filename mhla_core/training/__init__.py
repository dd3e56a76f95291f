"""The training skeleton shared by the four trainers: functions, not a framework.

A trainer builds its model, data and loss, then:

    acc = make_accelerator(args)                          # device, process group, mixed precision, tracker
    run = start_run(args, acc, out=..., project=..., config=..., frozen=...)   # owned run folder, resume check
    step = run.restore(model=..., optimizer=..., ema=..., scheduler=...)       # 0 on a fresh run
    model, optimizer = run.prepare(model, optimizer)      # DDP, loss-scaling optimiser, --compile
    while step < total:
        seed_step(args.seed, step, run.rank)              # one seeded step order
        stats = train_step(run, model, optimizer, micro_batches, loss_fn, clip_grad=...)
        constrain(model); ema.update(model); step += 1
        run.log({...}, step)  /  run.save(step, model=..., optimizer=..., ema=...)
    run.finish()

Built on accelerate where it does the job: `Accelerator` joins the process group, places the model, wraps
it in DDP, autocasts, scales the fp16 loss (`backward`, `clip_grad_norm_` unscales, the wrapped optimiser
skips overflowing steps), skips gradient sync on all but the last micro-batch (`no_sync`) and runs the
wandb tracker (wandb's own settings, WANDB_MODE or a stored login, decide online/offline; the run id is
kept in `run.json`, so --resume continues the same wandb run).

Where accelerate does not keep our guarantees, this module does it instead:
- Exact resume (4 straight steps equal 2, resume, 2): every random draw of a step is seeded from
  (seed, step, rank, micro-batch) (`seeding`) and every sample order is a pure function of the step, so
  the data position is the step. Accelerate's `save_state`/`load_state` + `skip_first_batches` restore RNG
  state and an iterator position instead, which depend on the worker count and on the DataLoader wrapper
  (it reshards samples over processes), and its `accumulate` keeps a step counter that is not saved.
- Atomic checkpoints: `save_state` writes several files into a folder in place, with no step and no
  config, so a kill between writes leaves a mixed set and a rerun overwrites a good checkpoint.
  `checkpoint.save_checkpoint` writes one folder under a temporary name, fsyncs, renames it into place,
  refuses non-finite weights, and stores the config that a resume must match (`check_same_config`).
- Schedulers are stepped by the trainers once per update (accelerate's wrapper steps them once per
  process), and FSDP2 sharding of the video model stays `mhla_videogen.fsdp` (per-block `fully_shard`
  with full, unsharded checkpoints).
"""

from mhla_core.training.args import add_training_args, make_parser, nonnegative_int, positive_int
from mhla_core.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mhla_core.training.ema import EMA
from mhla_core.training.seeding import epoch_permutation, sample_indices, seed_all, seed_step, step_seed
from mhla_core.training.session import Run, config_fields, make_accelerator, run_folder, start_run
from mhla_core.training.step import checkpoint_blocks, constrain, train_step

__all__ = [
    "EMA", "Run", "add_training_args", "checkpoint_blocks", "config_fields", "constrain", "epoch_permutation",
    "latest_checkpoint", "load_checkpoint", "make_accelerator", "make_parser", "nonnegative_int", "positive_int",
    "run_folder", "sample_indices", "save_checkpoint", "seed_all", "seed_step", "start_run", "step_seed",
    "train_step",
]
