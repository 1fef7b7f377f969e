#!/usr/bin/env bash
# The real Label Studio round trip (tests/test_export_label_studio.py), run by .ci/run on every
# submission: zslabel labels images, exports Label Studio tasks, a real Label Studio server (PyPI
# `label-studio`, on 127.0.0.1, fresh data dir) imports them, annotations are submitted and
# exported through its HTTP API, and `zslabel eval` reads that export.
#
# Label Studio is a Django application with ~160 pinned packages of its own (Django, DRF, boto3,
# ...); it cannot live in zslabel's locked .venv, so it gets its own venv, built once from
# requirements/label-studio.txt (the exact set) and cached between runs in
# ${ZSLABEL_LS_VENV:-~/.cache/zslabel-ci/label-studio-venv}; it is rebuilt when that file changes.
# zslabel itself only writes JSON and the test talks plain HTTP (requests, a test dependency).
#
# When the venv cannot be built (no registry, no wheel for this platform) the test is skipped
# with the reason (ZSLABEL_LS_UNAVAILABLE); a build that works but a round trip that fails, fails.
# Needs scripts/setup.sh first (.venv, and its uv when there).
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=requirements/label-studio.txt
VENV=${ZSLABEL_LS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/zslabel-ci/label-studio-venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.zslabel-requirements-$(sha1sum "$REQS" | cut -c1-16)"

build() {
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  # --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine) Django and its apps
  # would otherwise be compiled from source at every server start.
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install -q --compile-bytecode --python "$VENV/bin/python" -r "$REQS"
  else
    "$VENV/bin/python" -m pip install -q -r "$REQS"
  fi
  "$VENV/bin/python" -c "import label_studio"  # (label-studio --help would create a data dir in ~)
  touch "$STAMP"
}

if [ -f "$STAMP" ] && [ -x "$VENV/bin/label-studio" ]; then
  echo "ci_label_studio.sh: using the cached Label Studio venv $VENV"
else
  echo "ci_label_studio.sh: building the Label Studio venv $VENV from $REQS"
  t0=$SECONDS
  if build >"${TMPDIR:-/tmp}/zslabel-ls-venv-build.log" 2>&1; then
    echo "ci_label_studio.sh: Label Studio venv built in $((SECONDS - t0)) s"
  else
    export ZSLABEL_LS_UNAVAILABLE="the Label Studio venv could not be built in $VENV (log: ${TMPDIR:-/tmp}/zslabel-ls-venv-build.log): $(tail -n 3 "${TMPDIR:-/tmp}/zslabel-ls-venv-build.log" | tr '\n' ' ')"
    echo "ci_label_studio.sh: $ZSLABEL_LS_UNAVAILABLE" >&2
  fi
fi
export ZSLABEL_LS_VENV="$VENV"
# -m slow overrides the quick set's "not slow"; -n 0: one process (the test starts its own server).
.venv/bin/python -m pytest -q -n 0 -m slow -rs tests/test_export_label_studio.py
