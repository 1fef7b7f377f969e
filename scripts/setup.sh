#!/usr/bin/env bash
# Create .venv and install zslabel with its test extras.
# Where no NVIDIA GPU is present, the CPU build of torch is installed first, so that the
# project's torch range is already satisfied and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.3,<2.14"
  else
    # 2.13.0 is the CPU build on this machine's disk; elsewhere take PyTorch's CPU index.
    python -m pip install -q torch==2.13.0 2>/dev/null \
      || python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[test,s3]"
echo "zslabel installed in $(pwd)/.venv (activate with: . .venv/bin/activate)"
