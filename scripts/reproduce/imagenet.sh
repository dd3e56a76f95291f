#!/usr/bin/env bash
# Reproduce the paper's DeiT-T ImageNet-1k table: train every config on 8 GPUs, then evaluate its EMA weights.
#   IMAGENET=/data/imagenet bash scripts/reproduce/imagenet.sh [config-stem ...]
# IMAGENET must hold train/<class>/*.JPEG and val/<class>/*.JPEG. Runs land in runs/<config-stem>.
set -euo pipefail
: "${IMAGENET:?set IMAGENET to the ImageNet folder (train/ and val/ class folders)}"
GPUS=${GPUS:-8}
cd "$(dirname "$0")/../.."
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(deit_tiny_softmax_224 mhla_deit_tiny_224 deit_tiny_softmax_384 mhla_deit_tiny_384
                                       deit_tiny_softmax_512 mhla_deit_tiny_512 linear_deit_tiny_224)
for name in "${configs[@]}"; do
  cfg=mhla_image_classification/configs/$name.yaml
  out=runs/$name
  resume=(); [ -e "$out/last" ] && resume=(--resume)
  torchrun --nproc_per_node="$GPUS" -m mhla_image_classification.train --config "$cfg" --data-dir "$IMAGENET" \
    --output "$out" "${resume[@]}"
  python -m mhla_image_classification.eval --checkpoint "$out/last/ema.safetensors" --data-dir "$IMAGENET" \
    | tee "$out/eval_ema.txt"
done
