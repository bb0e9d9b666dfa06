#!/usr/bin/env python3
"""What operations cost a turn: `sub300 serve` with records, traces and JSON logs on, against all three off.

Two server processes, started here on 127.0.0.1, take the same aiortc calls
(one question each, interleaved question by question, each going first every other time;
scripts/bench_webrtc.py's caller) and the table gives each variant's server voice-to-voice and
mouth-to-ear estimate, p50/p95:

* ``ops-on``  — the defaults a production server runs: per-turn records in
  SQLite (a database of this run's own), authentication's middleware (off on
  loopback, its limits still counted), plus OpenTelemetry spans exported over
  OTLP/HTTP to a receiver in this script, and JSON log lines;
* ``ops-off`` — ``records.enabled = false``, no traces, plain logs.

It also checks that the records and the spans arrived (a count per variant),
so a fast ``ops-on`` that wrote nothing cannot pass for a cheap one.

    .venv/bin/python scripts/bench_ops.py --calls 6
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from bench_turns import QUESTIONS  # noqa: E402
from bench_webrtc import LEAD_S, TAIL_S, fmt, one_call, wait_healthy  # noqa: E402
from machine_info import describe_machine, percentile  # noqa: E402

from tests.speech import compose, speak  # noqa: E402

VARIANTS = ("ops-on", "ops-off")


async def otlp_receiver(port: int, received: list[int]) -> web.AppRunner:
    """Accepts OTLP/HTTP trace exports (counts the request bodies' bytes; the spans are not decoded)."""
    async def traces(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def server_env(variant: str, state: Path, otlp_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    env["XDG_STATE_HOME"] = str(state / variant)
    if variant == "ops-on":
        env.update(SUB300_TELEMETRY_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}/v1/traces",
                   SUB300_TELEMETRY_LOG_FORMAT="json")
    else:
        env["SUB300_RECORDS_ENABLED"] = "false"
    return env


def turns_recorded(state: Path, variant: str) -> int | None:
    db = state / variant / "sub300" / "records.db"
    if not db.exists():
        return None
    with sqlite3.connect(db) as c:
        return c.execute("select count(*) from turns where outcome = 'answered'").fetchone()[0]


async def run(args, questions) -> tuple[dict[str, list[dict]], dict[str, int | None], list[int]]:
    state = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    received: list[int] = []
    otlp_port = args.port + len(VARIANTS)
    receiver = await otlp_receiver(otlp_port, received)
    servers = {}
    for i, variant in enumerate(VARIANTS):
        servers[variant] = subprocess.Popen(
            [sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(args.port + i)],
            cwd=ROOT, env=server_env(variant, state, otlp_port), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        async with aiohttp.ClientSession() as session:
            for i, _ in enumerate(VARIANTS):
                await wait_healthy(session, f"http://127.0.0.1:{args.port + i}")
            for n, question in enumerate(questions, start=1):
                order = list(enumerate(VARIANTS))
                for i, variant in (order if n % 2 else order[::-1]):   # alternate who goes first
                    rows[variant].append(await one_call(session, f"http://127.0.0.1:{args.port + i}", n, question,
                                                        args.timeout, 4))
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGTERM)   # the drain writes what is queued and flushes the spans
        for server in servers.values():
            server.wait(60)
        await receiver.cleanup()
    return rows, {v: turns_recorded(state, v) for v in VARIANTS}, received


def main(args) -> int:
    print("making questions with Piper…", file=sys.stderr)
    questions = [(t, k, compose(LEAD_S, speak(t), TAIL_S)) for t, k in (QUESTIONS * args.calls)[:args.calls]]
    rows, recorded, exports = asyncio.run(run(args, questions))
    print(f"\n# Operations on vs off: aiortc calls against sub300 serve, {args.calls} per variant, interleaved")
    print(f"# {describe_machine()}\n")
    print("| variant | calls ok | server v2v p50 | p95 | estimate p50 | p95 | turns recorded | OTLP exports |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    failed = 0
    for variant in VARIANTS:
        ok = [r for r in rows[variant] if "error" not in r]
        failed += len(rows[variant]) - len(ok)
        cells = []
        for key in ("v2v", "est"):
            values = [r[key] for r in ok if r.get(key) is not None]
            cells += [fmt(percentile(values, q)) if values else "–" for q in (50, 95)]
        sent = f"{len(exports)} ({sum(exports) / 1024:.0f} kB)" if variant == "ops-on" else "–"
        print(f"| {variant} | {len(ok)}/{len(rows[variant])} | " + " | ".join(cells) +
              f" | {recorded[variant] if recorded[variant] is not None else '–'} | {sent} |")
    for variant in VARIANTS:
        for r in rows[variant]:
            if "error" in r:
                print(f"\n{variant} call {r['call']} failed: {r['error']}")
    if recorded["ops-on"] != len([r for r in rows["ops-on"] if "error" not in r]) or not exports:
        print("\nops-on did not record every answered turn or export any span: its figures do not count")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--timeout", type=float, default=120)
    sys.exit(main(parser.parse_args()))
