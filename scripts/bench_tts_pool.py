#!/usr/bin/env python3
"""How many syntheses at once?  N first pieces that arrive together through the shared TTS service.

For each pool size (``--workers``) and each N, N different first pieces (the
kind a reply starts with: a clause of up to 6 words) are submitted at the same
instant as COMMITTED requests to a `ScheduledSynthesizer` over the configured
Piper voice; a request's latency is submission → its first audio chunk (what
the caller waits for).  p50/p95 over all requests of all repetitions, and the
wall time until the last one is done.  Piper cannot synthesize several texts
in one run through piper-tts, so the choice is between pool sizes.

    python scripts/bench_tts_pool.py                    # pools of 1 and 2, N = 1, 2, 4
    python scripts/bench_tts_pool.py --workers 1,2,4 --sizes 1,4,8 --reps 5
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import describe_machine, percentile

from sub300.agent.config import load_config
from sub300.agent.engines import TTS_ENGINES
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.tts_service import ScheduledSynthesizer

PIECES = [
    "The capital of France is Paris.",
    "A week has seven days.",
    "The sky is blue on a clear day,",
    "One good book is Dune,",
    "Two plus two is four.",
    "Cats sleep most of the day,",
    "The Pacific is the largest ocean.",
    "Boil the egg for nine minutes.",
]


async def first_audio(service: ScheduledSynthesizer, text: str) -> float:
    t0 = time.perf_counter()
    chunks = service.synthesize_async(text, ticket=WorkTicket(Urgency.COMMITTED, label="bench"))
    try:
        async for _chunk in chunks:
            return time.perf_counter() - t0
    finally:
        await chunks.aclose()
    return time.perf_counter() - t0


async def run(workers: list[int], sizes: list[int], reps: int) -> None:
    config = load_config(None)
    engine = TTS_ENGINES[config.tts.engine](config)
    list(engine.synthesize("Warm up."))
    print(f"# TTS pool: {engine.name}, threads per synthesis {config.tts.threads}, {reps} reps — {describe_machine()}")
    print("| workers | N at once | first audio p50 (ms) | p95 (ms) | all done (ms, median) |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        for w in workers:
            service = ScheduledSynthesizer(engine, workers=w)
            latencies: list[float] = []
            walls: list[float] = []
            for rep in range(reps):
                texts = [PIECES[(rep + i) % len(PIECES)] for i in range(n)]
                t0 = time.perf_counter()
                latencies += await asyncio.gather(*(first_audio(service, t) for t in texts))
                walls.append(time.perf_counter() - t0)
            walls.sort()
            print(f"| {w} | {n} | {percentile(latencies, 50) * 1000:.0f} | {percentile(latencies, 95) * 1000:.0f} "
                  f"| {walls[len(walls) // 2] * 1000:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="pool sizes to compare, comma-separated")
    parser.add_argument("--sizes", default="1,2,4", help="first pieces at once, comma-separated")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run([int(w) for w in args.workers.split(",")], [int(n) for n in args.sizes.split(",")], args.reps))


if __name__ == "__main__":
    main()
