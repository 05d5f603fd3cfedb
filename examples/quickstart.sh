#!/usr/bin/env bash
# From nothing to a pre-trained tiny model on CPU: venv + install, data, TP=2 training, checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv.sh
.venv/bin/python -m megaswift.data.demo runs/quickstart/data
OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 --master-port 29517 \
  -m megaswift pt --config examples/pretrain/tiny_llama_tp2.yaml "$@"
.venv/bin/python - <<'PY'
import json
records = [json.loads(l) for l in open("runs/quickstart/metrics.jsonl")]
train = [r for r in records if "loss" in r]
evals = [r for r in records if "eval_loss" in r]
print(f"loss: step {train[0]['step']} {train[0]['loss']:.3f} -> step {train[-1]['step']} {train[-1]['loss']:.3f}")
if evals:
    print("eval_loss: " + ", ".join(f"step {r['step']} {r['eval_loss']:.3f}" for r in evals))
print("checkpoint: runs/quickstart/checkpoints (latest = " + open("runs/quickstart/checkpoints/latest").read().strip() + ")")
print("TensorBoard: .venv/bin/tensorboard --logdir runs/quickstart/tensorboard")
PY
