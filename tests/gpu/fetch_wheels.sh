#!/usr/bin/env bash
# Run HERE (where pip reaches the registry), before a GPU check on the lent machine, whose image has
# torch, transformers, peft, tensorboard and pytest but not megatron-core or datasets, and cannot
# download anything. Fetches those wheels into .whl/ (git-ignored, ~3.3 MB) for the device call to carry:
#   bash tests/gpu/fetch_wheels.sh
#   run(carry=[".whl"], command="RESULTS_DIR=$OUT bash tests/gpu/run.sh", timeout_s=540)
# tests/gpu/run.sh installs whatever .whl/ holds into a private folder before it starts.
# Transformer Engine is not among them: its torch binding is published as source only and must be
# compiled against the machine's torch, so the packed-THD tests skip (and say so) on that image.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
# The versions installed here, where the test suite passes.
pins=$("$PY" -c 'from importlib.metadata import version as v
print(*(f"{n}=={v(n)}" for n in ("megatron-core", "datasets", "dill", "multiprocess")))')
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl $pins
ls -l .whl
