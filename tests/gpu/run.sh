#!/usr/bin/env bash
# GPU check for csrc and the Transformer Engine paths (needs one CUDA GPU; about 4-6 minutes on an
# H200, under 8):
#   1. builds both extensions in place (the CUDA one is required: MEGASWIFT_BUILD_CUDA=1),
#   2. runs tests/kernels, CUDA tests (@pytest.mark.gpu) included, against the torch references,
#   3. runs tests/gpu: sequence packing through TE's THD attention (megatron-core PackedSeqParams)
#      against one sample per row, loss and gradients, and `megaswift sft` end to end (about 1.5
#      minutes; skipped, and said so, where Transformer Engine does not import),
#   3b. runs tests/models/test_torch_attention.py: the torch layer spec (SDPA; compiled FlexAttention with a
#      document mask for packed rows, GPU only) against megatron-core's local spec,
#   4. runs the GPU benchmark ([16384, 128256] bf16 vs torch and megatron-core) and writes
#      benchmarks/results/loss_kernel_cuda.json, plus the logs of each step beside it,
#   5. measures `megaswift pt` throughput (tokens/s, MFU in its log) on a Llama-3.2-1B shape at seq
#      4096 bf16 against a plain megatron-core loop: train_throughput_gpu.json.
# On the lent machine, whose image lacks megatron-core and datasets, carry the wheels that
# tests/gpu/fetch_wheels.sh downloads (.whl/); they are installed first. RESULTS_DIR=$OUT sends
# results and logs back.
# Uses .venv/bin/python when present, else python3 (or $PYTHON). Needs no network: the
# megatron-core baseline is skipped, and said so, where megatron-core is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RESULTS=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} MEGASWIFT_BUILD_CUDA=1
SECONDS=0

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried from tests/gpu/fetch_wheels.sh
  echo "== installing carried wheels: $(cd .whl && echo *.whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/megaswift-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/megaswift-site"
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

echo "== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0 default})"
"$PY" setup.py build_ext --inplace >"$RESULTS/gpu_build.log" 2>&1 || { tail -n 60 "$RESULTS/gpu_build.log"; exit 1; }
echo "built in ${SECONDS}s"
"$PY" -m megaswift doctor | tee "$RESULTS/gpu_doctor.txt"

echo "== tests/kernels (CUDA tests included)"
set +e
timeout 300 "$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "tests exit code $tests_rc after ${SECONDS}s"

echo "== tests/gpu (packed THD with Transformer Engine)"
"$PY" -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__version__)" 2>&1 | tail -n 1 || true
set +e
timeout 180 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_thd_tests.log"
thd_rc=${PIPESTATUS[0]}
set -e
echo "tests/gpu exit code $thd_rc after ${SECONDS}s"
[ "$tests_rc" -ne 0 ] || tests_rc=$thd_rc

echo "== torch layer spec (SDPA, compiled FlexAttention) vs the local spec"
set +e
timeout 240 "$PY" -m pytest tests/models/test_torch_attention.py -q -rs -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_torch_attention.log"
attn_rc=${PIPESTATUS[0]}
set -e
echo "torch attention tests exit code $attn_rc after ${SECONDS}s"
[ "$tests_rc" -ne 0 ] || tests_rc=$attn_rc

echo "== GPU benchmark"
bench_args=(--device cuda)
"$PY" -c "import megatron.core" 2>/dev/null || { echo "megatron-core not importable: its baseline is skipped"; bench_args+=(--no-megatron); }
timeout 240 "$PY" benchmarks/loss_kernel.py "${bench_args[@]}" --out "$RESULTS/loss_kernel_cuda.json" 2>&1 | tee "$RESULTS/gpu_benchmark.log"

echo "== training throughput: Llama-3.2-1B shape, seq 4096, bf16, megaswift pt vs a plain megatron-core loop"
if "$PY" -c "import megatron.core" 2>/dev/null; then
  # micro-batch 1: without Transformer Engine the local attention materialises [heads, seq, seq] scores.
  timeout 200 "$PY" benchmarks/train_throughput.py --preset llama-3.2-1b --overrides '{}' --seq-length 4096 \
    --micro-batch-size 1 --global-batch-size 8 --precision bf16 --steps 12 --warmup 4 --rounds 1 \
    --results-dir "$RESULTS" 2>&1 | tee "$RESULTS/gpu_train_throughput.log" || echo "throughput benchmark failed"
else
  echo "megatron-core not importable: skipped (carry its wheel: tests/gpu/fetch_wheels.sh)"
fi
echo "== done in ${SECONDS}s (tests exit code $tests_rc)"
exit "$tests_rc"
