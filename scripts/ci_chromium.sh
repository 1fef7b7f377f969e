#!/usr/bin/env bash
# Install Debian's chromium for the report's browser test (tests/test_review_report.py), when it
# is missing. Needs root (CI images run as root) and apt; where either is missing it says so
# and exits 0: the browser test then skips with its reason instead of the whole CI run failing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "ci_chromium.sh: $(chromium --version 2>/dev/null | head -1) already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_chromium.sh: chromium is not installed and this is not a root Debian/Ubuntu machine; the browser test will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: the browser and its libraries (~300 MB), not the desktop extras.
if ! { apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1 || \
       { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; }; then
  echo "ci_chromium.sh: apt-get could not install chromium; the browser test will skip"
  exit 0
fi
echo "ci_chromium.sh: installed $(chromium --version 2>/dev/null | head -1)"
