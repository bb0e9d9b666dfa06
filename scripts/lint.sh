#!/usr/bin/env bash
# Static checks on the runtime packages: ruff (lint) and mypy (types).
# Run after scripts/setup.sh --test-deps (CI runs it after the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check agent media models web sub300 tests scripts

# mypy finds modules by path, not through the editable install's import hook,
# so it reads the `sub300` namespace from a tree of links that mirrors the
# package-dir mapping in pyproject.toml.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/sub300"
for entry in sub300/*; do ln -s "$PWD/$entry" "$tree/sub300/"; done
for layer in agent media models web; do ln -s "$PWD/$layer" "$tree/sub300/$layer"; done
(cd "$tree" && "$OLDPWD/.venv/bin/mypy" --config-file "$OLDPWD/pyproject.toml" -p sub300)
