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
# with the reason (written to $VENV.unavailable, which the test reads); a build that works but a
# round trip that fails, fails. Needs scripts/setup.sh first (.venv, and its uv when there).
#
#   scripts/ci_label_studio.sh               build (or reuse) the venv, then run the test
#   scripts/ci_label_studio.sh --build-only  only build: .ci/run's slow set runs the test
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=requirements/label-studio.txt
VENV=${ZSLABEL_LS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/zslabel-ci/label-studio-venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.zslabel-requirements-$(sha1sum "$REQS" | cut -c1-16)"

build() {
  # (called in an `if`, where set -e is off: every step returns on failure itself)
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")" || return 1
  "$PY" -m venv "$VENV" || return 1
  # --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this machine) Django and its apps
  # would otherwise be compiled from source at every server start.
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install -q --compile-bytecode --python "$VENV/bin/python" -r "$REQS" || return 1
  else
    "$VENV/bin/python" -m pip install -q -r "$REQS" || return 1
  fi
  "$VENV/bin/python" -c "import label_studio" || return 1  # (label-studio --help would make a data dir in ~)
  touch "$STAMP"
}

template() {
  # An empty database with every migration applied, which each test run copies into its fresh
  # data dir: Label Studio's ~200 migrations cost ~90 CPU-seconds at every start otherwise
  # (measured: a server start 388 s -> 42 s on this loaded 2-core machine). `version` migrates
  # and exits without creating a user; HOME keeps its files out of ~.
  rm -rf "$VENV/template"
  mkdir -p "$VENV/template/home" || return 1
  HOME="$VENV/template/home" LABEL_STUDIO_BASE_DATA_DIR="$VENV/template/data" COLLECT_ANALYTICS=false \
    LATEST_VERSION_CHECK=false "$VENV/bin/label-studio" version >/dev/null || return 1
  mv "$VENV/template/data/label_studio.sqlite3" "$VENV/template/label_studio.sqlite3" || return 1
  rm -rf "$VENV/template/data" "$VENV/template/home"
}

LOG="${TMPDIR:-/tmp}/zslabel-ls-venv-build.log"
rm -f "$VENV.unavailable"
unavailable() {
  export ZSLABEL_LS_UNAVAILABLE="$1 (log: $LOG): $(tail -n 3 "$LOG" | tr '\n' ' ')"
  mkdir -p "$(dirname "$VENV")"
  echo "$ZSLABEL_LS_UNAVAILABLE" >"$VENV.unavailable"
  echo "ci_label_studio.sh: $ZSLABEL_LS_UNAVAILABLE" >&2
}
if [ -f "$STAMP" ] && [ -x "$VENV/bin/label-studio" ]; then
  echo "ci_label_studio.sh: using the cached Label Studio venv $VENV"
else
  echo "ci_label_studio.sh: building the Label Studio venv $VENV from $REQS"
  t0=$SECONDS
  if build >"$LOG" 2>&1; then
    echo "ci_label_studio.sh: Label Studio venv built in $((SECONDS - t0)) s"
  else
    unavailable "the Label Studio venv could not be built in $VENV"
  fi
fi
if [ -z "${ZSLABEL_LS_UNAVAILABLE:-}" ] && [ ! -f "$VENV/template/label_studio.sqlite3" ]; then
  t0=$SECONDS
  # Without it the test still runs, migrating at server start (slower): not a reason to skip.
  if template >"$LOG" 2>&1; then
    echo "ci_label_studio.sh: migrated template database made in $((SECONDS - t0)) s"
  else
    echo "ci_label_studio.sh: no template database (the server will migrate at start): $(tail -n 3 "$LOG" | tr '\n' ' ')" >&2
  fi
fi
[ "${1:-}" = "--build-only" ] && exit 0
export ZSLABEL_LS_VENV="$VENV"
# -m slow overrides the quick set's "not slow"; -n 0: one process (the test starts its own server).
.venv/bin/python -m pytest -q -s -n 0 -m slow -rs tests/test_export_label_studio.py
