"""End to end in a real browser: headless Debian Chromium calls `sub300 serve` over WebRTC.

The whole run — server and browsers — happens inside a loopback-only network
namespace made for it (`unshare -n`), where Chromium and aioice can pair on
127.0.0.1.  tests/browser_calls.py drives it: first one caller alone, then
three at once, each Chromium with its own fake microphone playing a spoken
question once.  The tests below check what it saw; screenshots land in
artifacts/browser/.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .speech import compose, save, speak

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "browser"
ALONE = ("france", "What is the capital of France?", {"capital", "france"})
TOGETHER = [
    ("spider", "How many legs does a spider have?", {"legs", "spider"}),
    ("ocean", "What is the largest ocean on Earth?", {"largest", "ocean"}),
    ("sky", "What color is the sky on a clear day?", {"sky", "clear"}),  # tiny.en sometimes hears "colors"
]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _can_run() -> str | None:
    if not os.path.exists("/usr/bin/chromium"):
        return "Debian chromium is not installed (/usr/bin/chromium)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip (util-linux, iproute2) are needed for the loopback-only namespace"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    return None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    wavs = tmp_path_factory.mktemp("browser")
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    # ≥0.5 s of leading silence (the fake mic starts with the call); more when three connect at once
    phases = []
    for group, lead in (([ALONE], 1.0), (TOGETHER, 2.5)):
        callers = []
        for name, text, _ in group:
            wav = save(wavs / f"{name}.wav", compose(lead, speak(text), 1.5))
            callers.append(f"{name}={wav}")
        phases += ["--phase", ",".join(callers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
               sys.executable, str(ROOT / "tests" / "browser_calls.py"), "--out", str(ARTIFACTS),
               "--timeout", "120", *phases]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    results_file = ARTIFACTS / "results.json"
    assert results_file.exists(), f"driver failed (rc {done.returncode}): {done.stderr[-3000:]}"
    results = json.loads(results_file.read_text())
    assert not results.get("error"), results["error"] + (ARTIFACTS / "server.log").read_text()[-3000:]
    return results


def _callers(results, phase: int) -> dict:
    return {c["name"]: c for c in results["phases"][phase]["callers"]}


def _check_caller(caller: dict, keys: set[str]) -> None:
    name = caller["name"]
    assert "error" not in caller, (name, caller.get("error"), caller.get("console"), caller.get("state"))
    state, dom = caller["state"], caller["dom"]
    assert state["connectedAt"] is not None and not state["error"], (name, state["error"])
    assert state["micPeakDb"] > -40, f"{name}: the fake microphone is silent ({state['micPeakDb']} dBFS)"
    assert state["stats"].get("micEnergy", 0) > 0, (name, state["stats"])
    # the page shows the final transcript with the question's key words
    assert any(keys <= words(text) for text in dom["finals"]), (name, dom["finals"], dom["transcript"])
    # the agent answered, and its audio reached the browser
    assert state["agentText"], name
    assert state["stats"].get("inboundEnergy", 0) > 0, (name, state["stats"])
    # the turn ledger and the browser's own mouth-to-ear figure are on the page
    (row, *_) = dom["ledgerRows"]
    assert row["segments"] >= 5 and row["v2v"].endswith("ms") and row["m2e"].endswith("ms"), row
    assert "(queued " in row["queues"], row   # an engine's queue wait next to its work (the ledger's queue_ms)
    assert re.fullmatch(r"\d+ ms", dom["m2eCard"]), dom["m2eCard"]
    (turn, *_) = state["turns"]
    onset = state["onsets"][0]
    assert onset["turn"] == turn["turn"] and onset["m2e"] > 0, state["onsets"]
    # the page reported its ear over the data channel; the server's ledger came back with both figures
    (report, *_) = state["reports"]
    assert report["turn"] == turn["turn"] and report["jitter_buffer_ms"] is not None, state["reports"]
    (heard, *_) = state["heard"]
    ledger = heard["ledger"]
    assert ledger["mouth_to_ear_reported_ms"] == pytest.approx(onset["m2e"], abs=0.1), (ledger, onset)
    assert ledger["mouth_to_ear_estimate_ms"] > ledger["voice_to_voice_ms"], ledger
    assert "first_audio_heard" in ledger["marks_ms"], ledger
    assert row["est"].startswith("est ") and row["est"].endswith("ms"), row
    assert caller["hung_up"], name


def test_a_browser_caller_is_heard_answered_and_shown_the_ledger(run):
    caller = _callers(run, 0)["france"]
    _check_caller(caller, ALONE[2])
    assert (ARTIFACTS / "france.png").stat().st_size > 10_000
    assert not caller.get("page_errors"), caller["page_errors"]


def test_three_browser_callers_at_once_each_get_their_own_answer(run):
    callers = _callers(run, 1)
    assert set(callers) == {name for name, _, _ in TOGETHER}
    for name, _, keys in TOGETHER:
        _check_caller(callers[name], keys)
        others = set().union(*(k for n, _, k in TOGETHER if n != name))
        assert not any(others & words(t["transcript"]) for t in callers[name]["state"]["turns"]), name
    call_ids = {c["state"]["callId"] for c in callers.values()}
    assert len(call_ids) == 3


def test_calls_are_torn_down_and_counted(run):
    assert run["calls_after"] == [], run["calls_after"]
    metrics = run["metrics"]
    assert 'sub300_calls_active{transport="webrtc"} 0.0' in metrics
    assert 'sub300_calls_total{transport="webrtc"} 4.0' in metrics
    assert 'sub300_turns_total{outcome="answered",transport="webrtc"} 4.0' in metrics
    assert 'sub300_mouth_to_ear_estimate_seconds_count{transport="webrtc"} 4.0' in metrics
    assert run["server_exit"] == 0
