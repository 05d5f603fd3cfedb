#!/usr/bin/env bash
# Creates .venv (Python 3.12) and installs megaswift with its test extras and the csrc extension.
# Idempotent: a second run only re-checks the installs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  if command -v pyenv >/dev/null 2>&1 && pyenv versions --bare | grep -x '3.12.1' >/dev/null; then
    PYENV_VERSION=3.12.1 python3 -m venv .venv
  else
    python3.12 -m venv .venv
  fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first: the csrc build (--no-build-isolation) compiles against the installed torch.
.venv/bin/python -m pip install --quiet 'torch==2.14.1' 'setuptools>=68' wheel ninja
# The editable install compiles csrc (minutes on 2 cores); skip it when this tree's build is already installed.
if [[ ${MEGASWIFT_REINSTALL:-0} == 1 ]] || ! .venv/bin/python -c "import torch, megaswift._kernels_cpu, megaswift, pytest, xdist, sys; \
    sys.exit(0 if megaswift.__file__.startswith('$PWD/') else 1)" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --no-build-isolation -e '.[test]'
fi
.venv/bin/python -c "import importlib.metadata as m; print(' | '.join(f'{n} {m.version(n)}' for n in ('torch', 'megatron-core', 'transformers', 'peft', 'trl')))"
