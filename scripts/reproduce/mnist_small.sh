#!/usr/bin/env bash
# Small-scale replication on one GPU: softmax, linear attention, MHLA-exact and MHLA-reference DeiTs
# (dim 64, depth 4) on the 5,000 embedded MNIST digits at 64 px, patch 4 (a 16x16 token grid, 16 blocks
# of 4x4 tokens as in the paper's 224 px models), 3 seeds each. Writes the table to ${1:-replication.md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m mhla_image_classification.demo --variants softmax linear mhla-exact mhla-reference --seeds 0 1 2 \
  --img-size 64 --patch 4 --piece 4 --epochs "${EPOCHS:-10}" --batch-size 128 --workers "${WORKERS:-8}" \
  --output runs/replication --markdown "${1:-replication.md}"
