"""scripts/gpu_check.sh --dry-run: the GPU check runs end to end on the CPU (tiny durations, N = 1, 2).

It runs the real engines through its four benchmarks (about two minutes), so it is
in the slow tier; on a GPU machine the same script runs without --dry-run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_dry_run_writes_a_row_per_n(tmp_path):
    out = tmp_path / "gpu-check-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == ["bench_turns", "bench_webrtc", "bench_tts_engines", "bench_load"]
    assert summary["torch_cuda_devices"] == "0"                   # no GPU here; PyTorch (sub300[coqui]) says so
    tts = (out / "tts.md").read_text()                             # Piper beside the Coqui engine, labelled
    assert "| piper (bundled voice joe) |" in tts
    assert "tiny random VITS — plumbing cost, not a voice" in tts and "tiny random XTTS streamed" in tts
    turns = (out / "turns.md").read_text()
    assert "voice_to_voice" in turns and "### vad 250 ms" in turns and "### smart-turn" in turns
    webrtc = (out / "webrtc.md").read_text()
    assert "estimate ms" in webrtc and "measured ms" in webrtc and "| p50 |" in webrtc

    load = json.loads((out / "load.json").read_text())
    assert load["complete"] and [row["calls"] for row in load["rows"]] == [1, 2]
    for row in load["rows"]:
        assert row["answered"] >= 1 and row["v2v_p50_ms"] > 0
        assert set(row["queue_ms"]) == {"stt", "llm", "tts"}
    table = (out / "load.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| ") and line[2].isdigit()] == ["1", "2"]

    capacity = json.loads((out / "capacity.json").read_text())
    assert set(capacity) == {"capacity_calls", "slo_ms", "machine", "date", "transport"}
    assert capacity["transport"] == "inproc" and capacity["slo_ms"] == 1000
    assert capacity["capacity_calls"] in (0, 1, 2)
