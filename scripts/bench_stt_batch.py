#!/usr/bin/env python3
"""Does batching Whisper help?  Batched calls against the same clips one after another, and the
latency of N final transcriptions that arrive at once through the shared STT service.

    python scripts/bench_stt_batch.py                       # batch sizes 1, 2, 4 on this machine
    python scripts/bench_stt_batch.py --sizes 1,4,8,16 --device cuda --reps 10

Clips: short questions spoken by Piper (tests/speech.py, deterministic), the
length of a caller's turn (1.5–4 s).  For each batch size N and each
repetition, N different clips are

* transcribed one after another (`WhisperRecognizer.transcribe`, the sum of
  the wall times) and in one batched call (`transcribe_batch`), the two
  orders alternating from repetition to repetition;
* submitted at the same instant as N COMMITTED requests to a
  `ScheduledRecognizer` (one worker) with ``max_batch=1`` (served one by
  one) and with ``max_batch=N`` (the first runs alone — it found the worker
  free — and the N-1 that queued behind it run as one batch); a request's
  latency is submission to result.

Medians over the repetitions for the wall times; p50/p95 over all requests
of all repetitions for the latencies.  The table goes to stdout with the
machine and the date.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine_info import describe_machine, percentile

from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.stt_service import ScheduledRecognizer
from sub300.models.stt_whisper import WhisperRecognizer

SENTENCES = [
    "What is the capital of France?",
    "Please call me back tomorrow morning about the weather report.",
    "Turn off the lights in the kitchen.",
    "How long does it take to boil an egg?",
    "Can you book a table for two at seven tonight?",
    "What time does the pharmacy close on Sundays?",
    "Tell me a short joke about penguins.",
    "I would like to change my delivery address please.",
    "Is it going to rain in Berlin this weekend?",
    "How many kilometres is it from Paris to Lyon?",
    "Remind me to water the plants every Monday.",
    "What is the square root of one hundred and forty four?",
    "Which team won the football match last night?",
    "Read me the first line of my newest email.",
    "Set a timer for twelve minutes.",
    "Who wrote the novel Pride and Prejudice?",
]


def make_clips(count: int) -> list[np.ndarray]:
    from tests.speech import speak

    return [speak(SENTENCES[i % len(SENTENCES)]).astype(np.float32) / 32768.0 for i in range(count)]


def wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wall_times(rec: WhisperRecognizer, clips: list[np.ndarray], batch_first: bool) -> tuple[float, float]:
    """(the clips one after another, one batched call): wall seconds."""
    def one_by_one() -> float:
        return sum(wall(lambda c=c: rec.transcribe(c)) for c in clips)

    def batched() -> float:
        return wall(lambda: rec.transcribe_batch(clips))

    if batch_first:
        b = batched()
        return one_by_one(), b
    s = one_by_one()
    return s, batched()


async def burst(service: ScheduledRecognizer, clips: list[np.ndarray]) -> list[float]:
    """N COMMITTED requests at the same instant; each one's latency (s).  Closes the service."""
    async def one(clip: np.ndarray) -> float:
        t0 = time.perf_counter()
        await service.transcribe_async(clip, ticket=WorkTicket(Urgency.COMMITTED, label="bench"))
        return time.perf_counter() - t0
    try:
        return list(await asyncio.gather(*(one(c) for c in clips)))
    finally:
        await service.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:whisper-tiny.en")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cpu-threads", type=int, default=0, help="CTranslate2 threads (0 = one per core)")
    ap.add_argument("--padding", choices=("short", "window", "full"), default="window")
    ap.add_argument("--sizes", default="1,2,4", help="batch sizes N, comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rec = WhisperRecognizer(args.model, device=args.device, cpu_threads=args.cpu_threads, padding=args.padding)
    clips = make_clips(max(sizes) + args.reps)
    rec.transcribe_batch(clips[:2])           # warm-up, not counted
    rec.transcribe(clips[0])
    rows = []
    for n in sizes:
        seq, bat, lat_one, lat_batch = [], [], [], []
        for rep in range(args.reps):
            group = [clips[(rep + i) % len(clips)] for i in range(n)]
            one_by_one, batched = wall_times(rec, group, batch_first=rep % 2 == 1)
            seq.append(one_by_one)
            bat.append(batched)
            lat_one.extend(asyncio.run(burst(ScheduledRecognizer(rec, workers=1, max_batch=1), group)))
            lat_batch.extend(asyncio.run(burst(ScheduledRecognizer(rec, workers=1, max_batch=n), group)))
        rows.append((n, statistics.median(seq), statistics.median(bat), lat_one, lat_batch))

    audio = statistics.mean(len(c) for c in clips) / 16_000
    print(f"STT batching, `{args.model}` on {rec.device}, padding {args.padding}, {args.reps} reps, "
          f"clips {audio:.1f} s on average — {describe_machine()}\n")
    print("| N | one after another (ms) | one batched call (ms) | batched / sequential "
          "| latency max_batch=1 p50 / p95 (ms) | latency max_batch=N p50 / p95 (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, seq_s, bat_s, one, batch in rows:
        print(f"| {n} | {seq_s * 1000:.0f} | {bat_s * 1000:.0f} | {bat_s / seq_s:.2f} "
              f"| {percentile(one, 50) * 1000:.0f} / {percentile(one, 95) * 1000:.0f} "
              f"| {percentile(batch, 50) * 1000:.0f} / {percentile(batch, 95) * 1000:.0f} |")


if __name__ == "__main__":
    main()
