#!/usr/bin/env bash
# Set up (venv, packages, bundled models, and as root the Debian packages the
# tests need), then run the whole test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test-deps
exec .venv/bin/python -m pytest "$@"
