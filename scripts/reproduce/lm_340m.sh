#!/usr/bin/env bash
# The paper's 340M language-model row on 8 GPUs: MHLA, GLA (fla) and Transformer++ (Llama/SDPA), 20480 steps
# of 8 x 2 x 16 x 2048 tokens (~10.7B), then sliding-window perplexity and lm-eval-harness (0-shot).
# Needs: a FineWeb-Edu-style text corpus as JSONL (CORPUS, field "text") and a tokenizer directory
# (TOKENIZER; the paper uses fla-hub/gla-1.3B-100B, vocab 32000), both local; pip install lm-eval for the harness.
#   CORPUS=/data/fineweb_edu_10B.jsonl TOKENIZER=/models/gla-tokenizer NGPU=8 scripts/reproduce/lm_340m.sh [mhla gla transformer]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
: "${CORPUS:?set CORPUS to a local .jsonl/.txt file or a saved dataset}" "${TOKENIZER:?set TOKENIZER to a local tokenizer directory}"
NGPU=${NGPU:-8}
RUN_DIR=${RUN_DIR:-runs/lm_340m}
MODELS=("${@:-mhla gla transformer}")
[ -d $RUN_DIR/data ] || $PY -m mhla_nlp.prepare_data --input "$CORPUS" --tokenizer "$TOKENIZER" --output $RUN_DIR/data \
  --seq-len 2048 --val-docs "${VAL_DOCS:-5000}" --num-proc "${NPROC:-32}"
for m in ${MODELS[@]}; do
  resume=(); [ -e "$RUN_DIR/$m/last" ] && resume=(--resume)
  [ -f $RUN_DIR/$m/final/config.json ] || torchrun --nproc_per_node "$NGPU" -m mhla_nlp.train \
    --config mhla_nlp/configs/${m}_340M.yaml --data $RUN_DIR/data --output $RUN_DIR/$m "${resume[@]}"
  $PY -m mhla_nlp.eval ppl --model $RUN_DIR/$m/final --tokenizer "$TOKENIZER" --data $RUN_DIR/data --split validation \
    --max-length 2048 --stride 1024 --max-tokens 2000000 --output $RUN_DIR/$m/val_ppl.json
  $PY -m mhla_nlp.eval harness --model $RUN_DIR/$m/final --tokenizer "$TOKENIZER" --output $RUN_DIR/$m/harness.json
done
