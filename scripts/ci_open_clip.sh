#!/usr/bin/env bash
# CI for the open-clip extra (issue 28), called by .ci/run on every submission: builds (or
# updates) .venv-openclip exactly as pinned in requirements/lock-open-clip.txt
# (scripts/setup.sh --open-clip), checks that lock against pyproject.toml, then runs the open_clip
# tests there (tests/test_openclip*.py; in the default .venv they skip or check the missing-extra
# message instead). Tiny checkpoints are built offline; nothing reaches a model hub.
#
#   scripts/ci_open_clip.sh          build (or update) .venv-openclip, then check and test
#   scripts/ci_open_clip.sh --built  .venv-openclip was just built by `scripts/setup.sh --open-clip`
#                                    (.ci/run's background build): skip the second pass of setup.sh
#                                    (38 s at load 10: uv re-checks the lock, rebuilds the editable wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") scripts/setup.sh --open-clip ;;
  --built) ;;
  *) echo "usage: scripts/ci_open_clip.sh [--built]" >&2; exit 2 ;;
esac
.venv-openclip/bin/python scripts/check_lock.py --open-clip
# -n 0: one module with one Ray test; a second pytest worker would only start a second Ray.
.venv-openclip/bin/python -m pytest -q -n 0 tests/test_openclip.py tests/test_openclip_default_env.py
echo "ci_open_clip.sh: open_clip environment built and tested in ${SECONDS} s"
