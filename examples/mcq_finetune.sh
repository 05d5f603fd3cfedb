#!/usr/bin/env bash
# Fine-tune, then evaluate on held-out questions: the MCQ set of examples/mcq_lookup_set.py, a tiny untaught
# Qwen2 (2 layers, width 128), `megaswift sft` on the training half, `megaswift eval` before and after.
# 1-2 minutes on 2 CPU cores (five processes, each importing torch); prints the held-out accuracy of both
# models (chance is 25%): untuned 25.0%, fine-tuned 100.0% here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/mcq_finetune}
PY=.venv/bin/python
rm -rf "$OUT" && mkdir -p "$OUT"

$PY examples/mcq_lookup_set.py --out "$OUT/mcq"
$PY -c "from megaswift.serve.tiny_model import build_tiny_chat_model as b; b('$OUT/base', steps=0, hidden=128)"
$PY -m megaswift convert hf2mcore "$OUT/base" "$OUT/init" --no-verify --no-progress
# one thread: a model this small trains fastest without OpenMP threads competing for the cores
OMP_NUM_THREADS=1 $PY -m megaswift sft --checkpoint.load "$OUT/init" --checkpoint.finetune true \
  --checkpoint.save "$OUT/sft" --data.datasets "$OUT/mcq/train.jsonl" --data.seq_length 80 \
  --data.cache_dir "$OUT/cache" --train.micro_batch_size 16 --train.global_batch_size 16 --train.train_iters 60 \
  --train.lr 1.5e-3 --train.lr_warmup_iters 0 --train.lr_decay_style constant --train.precision fp32 \
  --logging.output_dir "$OUT/sft/logs" --logging.progress_bar false --logging.tensorboard false
$PY -m megaswift eval --model "$OUT/base" --tasks "$OUT/mcq/test.csv" --output "$OUT/before.json"
$PY -m megaswift eval --model "$OUT/sft" --export-cache "$OUT/exported" --tasks "$OUT/mcq/test.csv" \
  --output "$OUT/after.json"
$PY - "$OUT" <<'PY'
import json, sys
acc = {when: json.load(open(f"{sys.argv[1]}/{when}.json"))["tasks"]["test.csv"]["accuracy"] for when in ("before", "after")}
print(f"held-out accuracy: untuned {acc['before']}%, fine-tuned {acc['after']}% (chance 25%)")
PY
