#!/usr/bin/env bash
# Small-LM replication on one GPU: MHLA (8 chunks of 64), linear attention (the same layer with all mixing
# weights fixed to 1) and softmax attention (Llama/SDPA), 4 layers, width 256, ~5.5M parameters each, on Python's own
# documentation (pydoc topics + standard-library docstrings, ~2.3 MB; see mhla_nlp/corpus.py), byte-level
# BPE 8192, rows of 512 tokens, SEEDS (default 0 1), STEPS (default 500) steps of 16 x 512 tokens.
# Writes the validation-perplexity table to ${1:-runs/lm_small/table.md}. RUN_DIR (default runs/lm_small) holds
# the corpus, the packed data and the runs; SMALL overrides the shared model fields (dry runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-runs/lm_small}
STEPS=${STEPS:-500}
SEEDS=${SEEDS:-0 1}
SMALL=${SMALL:-"hidden_size=256 num_hidden_layers=4 vocab_size=8192"}  # shared model fields (override for dry runs)
[ -f $RUN_DIR/corpus/corpus.json ] || $PY -m mhla_nlp.corpus --out $RUN_DIR/corpus
VAL=$($PY -c "import json; print(json.load(open('$RUN_DIR/corpus/corpus.json'))['val_docs'])")
[ -d $RUN_DIR/data ] || $PY -m mhla_nlp.prepare_data --input $RUN_DIR/corpus/corpus.jsonl --tokenizer $RUN_DIR/corpus/tokenizer \
  --output $RUN_DIR/data --seq-len 512 --val-docs "$VAL" --batch-docs 100000
for seed in $SEEDS; do
  for variant in mhla linear softmax; do
    case $variant in
      mhla) args=(--model mhla --model-kwargs $SMALL num_heads=4 chunk_size=64 max_chunks=8) ;;
      linear) args=(--model linear --model-kwargs $SMALL num_heads=4 chunk_size=64 max_chunks=8) ;;
      softmax) args=(--model transformer --model-kwargs $SMALL num_attention_heads=4 num_key_value_heads=4 \
                     intermediate_size=768 max_position_embeddings=512) ;;
    esac
    run=$RUN_DIR/${variant}_s$seed
    [ -f $run/final/config.json ] || $PY -m mhla_nlp.train --data $RUN_DIR/data --output $run "${args[@]}" --seed "$seed" \
      --batch-size 16 --max-steps "$STEPS" --warmup-steps 50 --lr 1e-3 --eval-every 100 \
      --checkpoint-every 0 --log-interval 50 --eval-batches "${EVAL_BATCHES:-100}"
    $PY -m mhla_nlp.eval ppl --model $run/final --tokenizer $RUN_DIR/corpus/tokenizer --data $RUN_DIR/data \
      --split validation --max-length 512 --stride 256 --max-tokens "${EVAL_TOKENS:-0}" --output $run/val_ppl.json
  done
done
$PY - "$RUN_DIR" "${1:-$RUN_DIR/table.md}" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, table = Path(sys.argv[1]), Path(sys.argv[2])
rows = ["| model | " + " | ".join(["val ppl per seed", "mean", "best in-training val ppl (mean)"]) + " |", "|---|---|---|---|"]
for v in ("mhla", "linear", "softmax"):
    runs = sorted(out.glob(f"{v}_s*"))
    ppl = [json.loads((r / "val_ppl.json").read_text())["ppl"] for r in runs]
    best = [min(json.loads(line)["val_ppl"] for line in (r / "log.jsonl").read_text().splitlines() if "val_ppl" in line)
            for r in runs]
    rows.append(f"| {v} | {', '.join(f'{p:.2f}' for p in ppl)} | {statistics.mean(ppl):.2f} | {statistics.mean(best):.2f} |")
table.write_text("\n".join(rows) + "\n")
print(table.read_text())
PYEOF
