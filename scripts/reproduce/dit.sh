#!/usr/bin/env bash
# Reproduce the paper's DiT-S/2 rows (class-conditional ImageNet 256, FID-50K: linear 89.7, softmax 68.4, MHLA 59.8):
# VAE latents -> training (DiT's recipe, 80 epochs = 400K updates) -> 50K samples (.npz) -> FID.
#   IMAGENET=/data/imagenet REF_BATCH=VIRTUAL_imagenet256_labeled.npz \
#   INCEPTION=/models/weights-inception-2015-12-05-6726825d.pth bash scripts/reproduce/dit.sh [mhla softmax linear]
# IMAGENET must hold train/<class>/*.JPEG. Every stage resumes where it stopped when the script is rerun.
# Knobs: GPUS (8), VAE (stabilityai/sd-vae-ft-ema or a local folder), LATENTS, RUNS, CFG (1.0: the paper's S/2
# numbers are unguided), NUM_SAMPLES (50000), SAMPLING_STEPS (250), PYTHON, and EXTRACT_ARGS / TRAIN_ARGS /
# SAMPLE_ARGS appended to each stage (e.g. TRAIN_ARGS="--max-steps 20" for a dry run).
set -euo pipefail
: "${IMAGENET:?set IMAGENET to the ImageNet folder (train/<class>/*.JPEG)}"
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
VAE=${VAE:-stabilityai/sd-vae-ft-ema}
LATENTS=${LATENTS:-latents/imagenet256}
RUNS=${RUNS:-runs}
CFG=${CFG:-1.0}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
SAMPLING_STEPS=${SAMPLING_STEPS:-250}
read -r -a extract_args <<< "${EXTRACT_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a sample_args <<< "${SAMPLE_ARGS:-}"
run=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m)
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(mhla softmax linear)

"${run[@]}" mhla_dit.extract_features --data-path "$IMAGENET/train" --out "$LATENTS" --vae "$VAE" --image-size 256 \
  "${extract_args[@]}"
for row in "${rows[@]}"; do
  out=$RUNS/dit_s2_$row
  resume=(); [ -e "$out/last" ] && resume=(--resume)
  "${run[@]}" mhla_dit.train --config "mhla_dit/configs/dit_s2_$row.yaml" --data-path "$LATENTS" --output "$out" \
    "${resume[@]}" "${train_args[@]}"
  npz=$out/samples_cfg${CFG}_n${NUM_SAMPLES}.npz
  [ -f "$npz" ] || "${run[@]}" mhla_dit.sample --ckpt "$out/last/ema.safetensors" --vae "$VAE" --cfg-scale "$CFG" \
    --num-samples "$NUM_SAMPLES" --npz "$npz" --num-sampling-steps "$SAMPLING_STEPS" "${sample_args[@]}"
  if [ -n "${REF_BATCH:-}" ] && [ -n "${INCEPTION:-}" ]; then
    "$PYTHON" -m mhla_dit.fid "$npz" --ref "$REF_BATCH" --inception-weights "$INCEPTION" --out-json "${npz%.npz}_fid.json"
  else
    echo "REF_BATCH or INCEPTION unset: skipping FID of $npz (mhla_dit.fid or the ADM evaluator can score it later)"
  fi
done
