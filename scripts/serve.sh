#!/usr/bin/env bash
# Set up (venv, packages, bundled models) and start the server on 127.0.0.1:8080.
# Extra arguments go to `sub300 serve` (e.g. --host 0.0.0.0 --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sub300 serve "$@"
