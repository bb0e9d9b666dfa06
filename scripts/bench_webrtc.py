#!/usr/bin/env python3
"""WebRTC calls against `sub300 serve`: the server's voice-to-voice, its mouth-to-ear estimate, and the caller's own.

Places K calls (one at a time unless --parallel) with aiortc callers
(sub300/testing/aiortc_caller.py), each asking one recorded question (Piper,
made here), and prints per turn and as p50/p95:

* server v2v — the ledger's voice-to-voice (true end of speech → first agent frame sent);
* estimate — the server's mouth-to-ear estimate (ledger ``mouth_to_ear_estimate_ms``:
  inbound transport + v2v + outbound transport, from its own measurements and
  the caller's ear_report: media/webrtc/ear_report.py);
* measured — the caller's own mouth-to-ear (the clip's last frame sent → the
  reply's first loud frame out of its jitter buffer and decoder);
* est−meas — their difference (goal: |p50| ≤ 30 ms);
* transport — measured − v2v: what the transport adds (goal on loopback: p50 ≤ 80 ms);
* the transport parts the ledger recorded (p50).

--compare runs variants of the jitter buffers in one run, calls interleaved
question by question, one server process per variant (each started here):
``SERVER/CALLER`` frames of prefetch (aiortc's own is 4/4; media/webrtc/jitter.py).
--browser places the calls from headless Chromium (tests/browser_calls.py, in
a loopback-only network namespace) instead; its variants are the page's
``?jbt=`` (jitter-buffer target, ms, or ``default``) with the server's prefetch:
``SERVER/JBT``.  An empty SERVER is the server's default (webrtc.jitter_prefetch_frames).

    .venv/bin/python scripts/bench_webrtc.py --calls 6
    .venv/bin/python scripts/bench_webrtc.py --calls 6 --compare 4/4,1/1,0/1
    .venv/bin/python scripts/bench_webrtc.py --calls 6 --browser --compare 4/default,0/0
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
from bench_turns import QUESTIONS  # noqa: E402
from machine_info import describe_machine, percentile  # noqa: E402

from sub300.agent.ledger import TRANSPORT_PARTS  # noqa: E402
from sub300.testing.aiortc_caller import AiortcCaller  # noqa: E402
from tests.speech import compose, save, speak  # noqa: E402

LEAD_S, TAIL_S = 0.8, 1.5
COLUMNS = (("v2v", "server v2v"), ("est", "estimate"), ("m2e", "measured"), ("err", "est−meas"),
           ("share", "transport"))


def server_env(prefetch: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    if prefetch not in (None, ""):
        env["SUB300_WEBRTC_JITTER_PREFETCH_FRAMES"] = str(prefetch)
    return env


def start_server(port: int, prefetch: str | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=server_env(prefetch), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(url + "/healthz") as r:
                return await r.json()
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def row_from(ledger: dict, measured: float | None) -> dict:
    v2v, est = ledger.get("voice_to_voice_ms"), ledger.get("mouth_to_ear_estimate_ms")
    row = {"v2v": v2v, "est": est, "m2e": measured, "parts": ledger.get("transport_ms", {})}
    if est is not None and measured is not None:
        row["err"] = est - measured
    if v2v is not None and measured is not None:
        row["share"] = measured - v2v
    return row


async def one_call(session, url: str, index: int, question: tuple, timeout: float, caller_prefetch: int) -> dict:
    text, keys, pcm = question
    caller = AiortcCaller(url, session, jitter_prefetch=caller_prefetch)
    row: dict = {"call": index, "question": text}
    try:
        await caller.connect()
        caller.say(pcm)
        (turn,) = await caller.wait_for_turns(1, timeout)
        await caller.wait_for(lambda: bool(caller.onsets), 5, "reply onset")
        await caller.wait_for(lambda: bool(caller.events_of("turn_heard")), 5, "turn_heard")
        heard = caller.events_of("turn_heard")[0]["ledger"]
        row.update(row_from(heard, caller.onsets[0].mouth_to_ear_ms),
                   heard_ok=all(k in turn["transcript"].lower() for k in keys))
    except Exception as exc:   # one failed call is a row, not the end of the run
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await caller.hang_up()
    return row


async def run_aiortc(args, variants: list[tuple[str, str]], questions) -> tuple[dict[str, list[dict]], dict]:
    servers = {v: start_server(args.port + i, v[0]) for i, v in enumerate(variants)}
    rows: dict[str, list[dict]] = {"/".join(v): [] for v in variants}
    health: dict = {}
    try:
        async with aiohttp.ClientSession() as session:
            for i, _ in enumerate(variants):
                health = await wait_healthy(session, f"http://127.0.0.1:{args.port + i}")
            for n, question in enumerate(questions, start=1):
                for i, (server, caller) in enumerate(variants):
                    row = await one_call(session, f"http://127.0.0.1:{args.port + i}", n, question, args.timeout,
                                         int(caller))
                    rows[f"{server}/{caller}"].append(row)
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGTERM)
        for server in servers.values():
            server.wait(30)
    return rows, health


def run_browser(args, variants: list[tuple[str, str]], questions) -> tuple[dict[str, list[dict]], dict]:
    """Each variant: one `sub300 serve` and one Chromium per call, calls one after the other (browser_calls.py)."""
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wavs = []
        for n, (text, keys, pcm) in enumerate(questions, start=1):
            wavs.append((n, text, keys, save(Path(tmp) / f"q{n}.wav", pcm)))
        for i, (server, jbt) in enumerate(variants):
            out = Path(tmp) / f"v{i}"
            phases = [arg for n, _, _, wav in wavs for arg in ("--phase", f"q{n}={wav}")]
            command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                       str(ROOT / "tests" / "browser_calls.py"), "--out", str(out), "--port", str(args.port + i),
                       "--timeout", str(args.timeout), "--query", f"jbt={jbt}", *phases]
            if server:   # "" = the server's configured default
                command += ["--server-env", f"SUB300_WEBRTC_JITTER_PREFETCH_FRAMES={server}"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=server_env(None))
            results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
            if not results or results.get("error"):
                sys.exit(f"browser run failed (rc {done.returncode}): {results.get('error') or done.stderr[-2000:]}")
            variant_rows = rows.setdefault(f"{server}/{jbt}", [])
            for (n, text, _keys, _), phase in zip(wavs, results["phases"], strict=True):
                caller = phase["callers"][0]
                row: dict = {"call": n, "question": text}
                state = caller.get("state") or {}
                heard = state.get("heard") or []
                if caller.get("error") or not heard or not state.get("onsets"):
                    row["error"] = caller.get("error") or "no turn_heard from the server"
                else:
                    row.update(row_from(heard[0]["ledger"], state["onsets"][0]["m2e"]), heard_ok=True)
                variant_rows.append(row)
    return rows, {"engines": "sub300 serve defaults"}


def fmt(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def print_tables(args, rows: dict[str, list[dict]], health: dict) -> int:
    who = "Chromium (Playwright, fake microphone)" if args.browser else "aiortc callers"
    print(f"\n# WebRTC turns ({who}, {args.calls} calls per variant, interleaved)")
    print(f"# {describe_machine()}")
    print(f"# engines: {health.get('engines')}")
    failed = 0
    for variant, variant_rows in rows.items():
        label = "server prefetch / page jitterBufferTarget" if args.browser else "server / caller prefetch"
        print(f"\n## {label}: {variant}\n")
        print("| call | question | " + " | ".join(f"{name} ms" for _, name in COLUMNS) + " | " +
              " | ".join(TRANSPORT_PARTS) + " |")
        print("|---|---|" + "---:|" * (len(COLUMNS) + len(TRANSPORT_PARTS)))
        ok = [r for r in variant_rows if "error" not in r]
        for r in variant_rows:
            if "error" in r:
                print(f"| {r['call']} | {r['question']} | failed: {r['error']} |")
                continue
            print(f"| {r['call']} | {r['question']} | " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " | " +
                  " | ".join(fmt(r["parts"].get(p)) for p in TRANSPORT_PARTS) + " |")
        for q in (50, 95):
            cells = [percentile([r[k] for r in ok if r.get(k) is not None], q) if any(r.get(k) is not None
                     for r in ok) else None for k, _ in COLUMNS]
            parts = [percentile([r["parts"][p] for r in ok if p in r["parts"]], q)
                     if any(p in r["parts"] for r in ok) else None for p in TRANSPORT_PARTS]
            print(f"| p{q} | | " + " | ".join(map(fmt, cells)) + " | " + " | ".join(map(fmt, parts)) + " |")
        errs = [abs(r["err"]) for r in ok if r.get("err") is not None]
        if errs:
            print(f"\n|estimate − measured|: p50 {percentile(errs, 50):.0f} ms, p95 {percentile(errs, 95):.0f} ms")
        failed += len(variant_rows) - len(ok)
    if failed:
        print(f"\n{failed} call(s) failed")
    return 1 if failed else 0


def main(args) -> int:
    print("making questions with Piper…", file=sys.stderr)
    questions = [(t, k, compose(LEAD_S, speak(t), TAIL_S)) for t, k in (QUESTIONS * args.calls)[:args.calls]]
    peer = "default" if args.browser else "4"     # a stock peer: the browser's own target, aiortc's prefetch
    variants = [(v.split("/", 1)[0], v.split("/", 1)[1] if "/" in v else peer)
                for v in (args.compare or f"/{peer}").split(",")]
    if args.browser:
        rows, health = run_browser(args, variants, questions)
    else:
        rows, health = asyncio.run(run_aiortc(args, variants, questions))
    return print_tables(args, rows, health)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--compare", help="variants SERVER/CALLER (aiortc prefetch) or SERVER/JBT (--browser), "
                                          "comma-separated; default: the server's default against a stock peer")
    parser.add_argument("--browser", action="store_true", help="Chromium callers instead of aiortc ones")
    sys.exit(main(parser.parse_args()))
