#!/usr/bin/env bash
# System packages the test suite uses: Debian's Chromium for the browser tests, and a C++ compiler
# for trainer.compile (torch.compile's CPU backend builds C++). Needs root (as in CI); elsewhere it
# says what to install, and the tests that need them are skipped.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "test-deps: not found: ${missing[*]}; install these Debian packages to run the browser and trainer.compile tests" >&2
fi
