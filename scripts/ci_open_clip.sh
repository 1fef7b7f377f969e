#!/usr/bin/env bash
# CI for the open-clip extra (issue 28), called by .ci/run on every submission: builds (or
# updates) .venv-openclip exactly as pinned in requirements/lock-open-clip.txt
# (scripts/setup.sh --open-clip), checks that lock against pyproject.toml, then runs the open_clip
# tests there (tests/test_openclip*.py; in the default .venv they skip or check the missing-extra
# message instead). Tiny checkpoints are built offline; nothing reaches a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --open-clip
.venv-openclip/bin/python scripts/check_lock.py --open-clip
# -n 0: one module with one Ray test; a second pytest worker would only start a second Ray.
.venv-openclip/bin/python -m pytest -q -n 0 tests/test_openclip.py tests/test_openclip_default_env.py
echo "ci_open_clip.sh: open_clip environment built and tested in ${SECONDS} s"
