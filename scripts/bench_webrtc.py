#!/usr/bin/env python3
"""WebRTC calls against `sub300 serve`: the server's voice-to-voice beside the caller's mouth-to-ear.

Places K calls (P at a time) with aiortc callers (media/webrtc/client.py), each
asking one recorded question (Piper, made here, trimmed to its voiced span),
and prints per turn and as p50/p95: the server's ledger voice-to-voice, the
caller-measured mouth-to-ear (the clip's last frame sent → the reply's first
loud frame out of the caller's jitter buffer), and their difference — the
transport, jitter buffers and the end-of-speech estimate that the ledger
cannot see.  The server runs as its own process (started here unless --url),
so the callers do not share its event loop or its cores' scheduling.

    .venv/bin/python scripts/bench_webrtc.py --calls 6
    .venv/bin/python scripts/bench_webrtc.py --calls 6 --parallel 3
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
from bench_turns import QUESTIONS  # noqa: E402
from machine_info import describe_machine, percentile  # noqa: E402

from sub300.agent.ledger import STAGES  # noqa: E402
from sub300.testing.aiortc_caller import AiortcCaller  # noqa: E402
from tests.speech import compose, speak  # noqa: E402

LEAD_S, TAIL_S = 0.8, 1.5


def start_server(port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    return subprocess.Popen([sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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


async def one_call(session, url: str, index: int, question: tuple, timeout: float) -> dict:
    text, keys, pcm = question
    caller = AiortcCaller(url, session)
    row = {"call": index, "question": text}
    try:
        await caller.connect()
        caller.say(pcm)
        (turn,) = await caller.wait_for_turns(1, timeout)
        await caller.wait_for(lambda: bool(caller.onsets), 5, "reply onset")
        ledger = turn["ledger"]
        heard = turn["transcript"].lower()
        row.update(
            transcript=turn["transcript"], reply=turn["reply"], heard_ok=all(k in heard for k in keys),
            v2v=ledger["voice_to_voice_ms"], m2e=caller.onsets[0].mouth_to_ear_ms, stages=ledger["stages_ms"])
    except Exception as exc:   # one failed call is a row, not the end of the run
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await caller.hang_up()
    return row


async def main(args) -> int:
    print("making questions with Piper…", file=sys.stderr)
    questions = [(t, k, compose(LEAD_S, speak(t), TAIL_S)) for t, k in (QUESTIONS * args.calls)[:args.calls]]
    server = None if args.url else start_server(args.port)
    url = args.url or f"http://127.0.0.1:{args.port}"
    rows: list[dict] = []
    try:
        async with aiohttp.ClientSession() as session:
            health = await wait_healthy(session, url)
            sem = asyncio.Semaphore(args.parallel)

            async def limited(i, q):
                async with sem:
                    return await one_call(session, url, i, q, args.timeout)

            rows = await asyncio.gather(*(limited(i + 1, q) for i, q in enumerate(questions)))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    print(f"\n# WebRTC turns (aiortc callers, {args.calls} calls, {args.parallel} at a time)")
    print(f"# {describe_machine()}")
    print(f"# engines: {health.get('engines')}")
    stage_names = [s for s, _ in STAGES]
    print("\n| call | question | heard | server v2v ms | mouth-to-ear ms | difference ms | "
          + " | ".join(stage_names) + " |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(stage_names))
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"| {r['call']} | {r['question']} | failed: {r['error']} |")
            continue
        stages = " | ".join(f"{r['stages'].get(s, float('nan')):.0f}" for s in stage_names)
        print(f"| {r['call']} | {r['question']} | {'yes' if r['heard_ok'] else 'NO'} | {r['v2v']:.0f} | "
              f"{r['m2e']:.0f} | {r['m2e'] - r['v2v']:.0f} | {stages} |")
    for q in (50, 95):
        cols = [percentile([r[k] for r in ok], q) for k in ("v2v", "m2e")]
        diff = percentile([r["m2e"] - r["v2v"] for r in ok], q)
        stages = " | ".join(f"{percentile([r['stages'].get(s, 0.0) for r in ok], q):.0f}" for s in stage_names)
        print(f"| p{q} | | | {cols[0]:.0f} | {cols[1]:.0f} | {diff:.0f} | {stages} |")
    failed = len(rows) - len(ok)
    if failed:
        print(f"\n{failed} call(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--url", help="an already running server (default: start `sub300 serve` here)")
    parser.add_argument("--timeout", type=float, default=120)
    sys.exit(asyncio.run(main(parser.parse_args())))
