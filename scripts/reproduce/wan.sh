#!/usr/bin/env bash
# Reproduce the paper's Wan2.1-T2V-1.3B rows (VBench: softmax 83.31, MHLA hybrid 2/3 83.82, full 82.83):
# precompute latents -> fine-tune Wan into MHLA (the authors' recipe) -> generate the prompt set -> (VBench: yours).
#   WAN=/models/Wan2.1-T2V-1.3B-Diffusers DATA=/data/videos PROMPTS=vbench_prompts.txt \
#   bash scripts/reproduce/wan.sh [hybrid full softmax]
# WAN: a local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (nothing is downloaded). DATA: a folder with
# metadata.jsonl ({"video": PATH, "caption": TEXT} per line; the paper's fine-tuning data is not public).
# PROMPTS: one prompt per line (e.g. VBench's prompt list); without it the generation stage is skipped.
# "softmax" generates with the original transformer (the baseline row, no training).
# Every stage resumes where it stopped when the script is rerun.
# Knobs: GPUS (8), LATENTS, RUNS, VIDEOS, PYTHON, and EXTRACT_ARGS / TRAIN_ARGS / GENERATE_ARGS appended to each
# stage (e.g. TRAIN_ARGS="--max-steps 20" for a dry run, GENERATE_ARGS="--steps 10 --frames 17").
set -euo pipefail
: "${WAN:?set WAN to a local Wan2.1-T2V-1.3B-Diffusers folder}"
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
LATENTS=${LATENTS:-latents/wan_480x800x81}
RUNS=${RUNS:-runs}
VIDEOS=${VIDEOS:-videos}
read -r -a extract_args <<< "${EXTRACT_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a generate_args <<< "${GENERATE_ARGS:-}"
run=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m)
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(hybrid full softmax)

needs_training=0
for row in "${rows[@]}"; do [ "$row" = softmax ] || needs_training=1; done
if [ "$needs_training" = 1 ]; then
  : "${DATA:?set DATA to a folder with metadata.jsonl (video + caption per line)}"
  "${run[@]}" mhla_videogen.extract --model "$WAN" --data "$DATA" --out "$LATENTS" "${extract_args[@]}"
fi
for row in "${rows[@]}"; do
  transformer=()
  if [ "$row" != softmax ]; then
    out=$RUNS/wan_$row
    resume=(); [ -e "$out/last" ] && resume=(--resume)
    "${run[@]}" mhla_videogen.train --config "mhla_videogen/configs/wan_$row.yaml" --init-wan "$WAN/transformer" \
      --data "$LATENTS" --output "$out" "${resume[@]}" "${train_args[@]}"
    transformer=(--transformer "$out/final")
  fi
  if [ -n "${PROMPTS:-}" ]; then
    "${run[@]}" mhla_videogen.generate --model "$WAN" "${transformer[@]}" --prompts-file "$PROMPTS" \
      --out-dir "$VIDEOS/wan_$row" --skip-existing "${generate_args[@]}"
  else
    echo "PROMPTS not set: skipping generation for $row"
  fi
done
echo "VBench is not run by this script: score the videos under $VIDEOS/ with VBench's own tooling."
