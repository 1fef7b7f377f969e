#!/usr/bin/env bash
# Create .venv and install zslabel with its test extras, exactly as pinned in requirements/lock.txt.
#
# The installer is uv (pinned in the lock, bootstrapped with pip): it installs the ~125 locked
# packages in parallel, ~50 s on a 2-core machine with an empty cache, where pip takes ~4 min.
# Without uv (ZSLABEL_NO_UV=1, or no wheel for this platform) pip installs the same lock.
# Where no NVIDIA GPU is present, the CPU build of torch is installed first, so that the
# project's torch pin is already satisfied and nothing ever pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
phase() { echo "setup.sh: $1 done at ${SECONDS} s"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
phase "venv"
. .venv/bin/activate
TORCH=$(grep -E '^torch==' "$LOCK" | cut -d= -f3)

UV=""
if [ -z "${ZSLABEL_NO_UV:-}" ] && python -m pip install -q -c "$LOCK" uv 2>/dev/null; then
  UV=".venv/bin/uv"
fi
phase "installer (${UV:-pip})"
# --compile-bytecode: uv leaves compiling to first import, and where PYTHONDONTWRITEBYTECODE
# is set (this machine, some CI images) nothing is ever cached: every Ray worker then compiled
# torch and transformers from source, 27 s per import instead of 12 s, and the test suite ran
# 2.2x slower. pip compiles at install by default.
install() {  # install ARGS... with uv when there is one, else pip
  if [ -n "$UV" ]; then "$UV" pip install -q --compile-bytecode --python .venv/bin/python "$@"; else python -m pip install -q "$@"; fi
}

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    install "torch==$TORCH"
  else
    # The CPU wheel: from pip's configured find-links where it lies on disk (this machine's
    # /opt/wheels), else from PyPI's CPU index. uv does not read pip's config, so pass it on.
    LINKS=${PIP_FIND_LINKS:-$(python -m pip config get global.find-links 2>/dev/null || true)}
    if ! { [ -n "$LINKS" ] && ls "$LINKS"/torch-"$TORCH"+cpu-*.whl >/dev/null 2>&1 \
           && install --find-links "$LINKS" "torch==$TORCH+cpu"; }; then
      install "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu
    fi
    python -W ignore - <<'PY'
import sys, torch
if torch.version.cuda:
    sys.exit(f"setup.sh: a CUDA build of torch ({torch.__version__}) was installed on a machine without a GPU")
PY
  fi
  phase "torch"
fi
install -c "$LOCK" -e ".[test,s3,lint]"
# The editable project's own modules, for the same reason (compileall writes despite the variable).
python -m compileall -q zslabel zslabel_dev >/dev/null
phase "locked packages"
echo "zslabel installed in $(pwd)/.venv (activate with: . .venv/bin/activate)"
