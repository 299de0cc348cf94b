#!/usr/bin/env bash
# System packages the test suite uses: Debian's Chromium for the browser tests. Needs root (as in CI);
# elsewhere it says what to install and the browser tests are skipped.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "test-deps: chromium not found; install Debian's 'chromium' package to run the browser tests" >&2
fi
