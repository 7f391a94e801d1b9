#!/usr/bin/env bash
# Create .venv with the engine, its dependencies and the dev tools. Safe to run again.
#
# Where no CUDA driver is present, the CPU build of torch is installed first, so that nothing
# later pulls a multi-gigabyte CUDA build. Override with TORCH_SPEC (and pip's own
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL where your CPU wheels come from another index).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    python -m pip install --quiet "${TORCH_SPEC:-torch}"
  else
    python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi

# DeepSpeed ships as source; its CUDA ops are built on first use (JIT) or not at all on CPU.
DS_BUILD_OPS=${DS_BUILD_OPS:-0} python -m pip install --quiet -e ".[${EXTRAS}]"
python -c "import torch, finetune; print(f'finetune {finetune.__version__} ready: torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
