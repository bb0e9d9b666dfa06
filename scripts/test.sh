#!/usr/bin/env bash
# Set up (venv, packages, bundled models, and as root the Debian packages the
# tests need), then run the whole test suite in its two tiers:
#   fast: named fakes and virtual time, no model loaded (seconds)
#   slow: the real engines on the bundled models, real browser and SIP peers
# Extra arguments go to pytest (both tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test-deps

tier() {  # pytest exits 5 when a selection holds no test: not a failure here
  local rc=0
  .venv/bin/python -m pytest -m "$1" "${@:2}" || rc=$?
  [[ $rc == 0 || $rc == 5 ]] || return $rc
}
echo "[test] fast tier" >&2
tier "not slow" "$@"
echo "[test] slow tier" >&2
tier slow "$@"
