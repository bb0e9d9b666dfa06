#!/usr/bin/env python3
"""TTS engines side by side, in one run: first audio, whole piece and real-time factor per engine.

Each engine synthesizes the same first pieces (the clauses a reply starts with) through the
shared TTS service (`ScheduledSynthesizer`, one at a time, as the pipeline calls it), the
engines taking turns piece by piece so that they share the machine's state.  Per engine:
first audio (request → first chunk, what the caller waits for) p50/p95, the whole piece p50,
the real-time factor (synthesis time / audio seconds) p50, and chunks per piece.

Engines: ``piper`` (the bundled voice, sub300[piper]), and with sub300[coqui] installed
``coqui-tiny-vits`` and ``coqui-tiny-xtts``: TINY RANDOM-WEIGHT models built here with
Coqui's own classes (sub300/testing/tiny_coqui.py).  Their rows are the Coqui engine's
PLUMBING COST (PyTorch, Coqui's text processing, the engine, the thread hop), not a voice:
a real VITS or XTTS costs its own inference on top.  ``--coqui-model`` adds a real Coqui
model (a folder, or a name already downloaded) as ``coqui``.

    python scripts/bench_tts_engines.py                         # piper, coqui-tiny-vits, coqui-tiny-xtts
    python scripts/bench_tts_engines.py --reps 10 --device cuda # the Coqui engines on the GPU
    python scripts/bench_tts_engines.py --engines piper,coqui --coqui-model ~/voices/xtts_v2
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tts_pool import PIECES  # the same first pieces as the pool benchmark
from machine_info import describe_machine, percentile

from sub300.models.protocols import SpeechSynthesizer
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.tts_service import ScheduledSynthesizer

LABELS = {
    "piper": "piper (bundled voice joe)",
    "coqui-tiny-vits": "coqui, tiny random VITS — plumbing cost, not a voice",
    "coqui-tiny-xtts": "coqui, tiny random XTTS streamed — plumbing cost, not a voice",
    "coqui": "coqui (--coqui-model)",
}


def builders(args: argparse.Namespace, scratch: Path) -> dict[str, Callable[[], SpeechSynthesizer]]:
    def piper() -> SpeechSynthesizer:
        from sub300.models.tts_piper import PiperSynthesizer

        return PiperSynthesizer(threads=args.threads, device=args.device)

    def coqui(folder_or_name: str | Path) -> SpeechSynthesizer:
        from sub300.models.tts_coqui import CoquiSynthesizer

        return CoquiSynthesizer(folder_or_name, device=args.device, threads=args.threads)

    def tiny_vits() -> SpeechSynthesizer:
        from sub300.testing.tiny_coqui import build_tiny_vits

        return coqui(build_tiny_vits(scratch / "tiny-vits"))

    def tiny_xtts() -> SpeechSynthesizer:
        from sub300.testing.tiny_coqui import build_tiny_xtts

        return coqui(build_tiny_xtts(scratch / "tiny-xtts"))

    return {"piper": piper, "coqui-tiny-vits": tiny_vits, "coqui-tiny-xtts": tiny_xtts,
            "coqui": lambda: coqui(args.coqui_model)}


async def one_piece(service: ScheduledSynthesizer, text: str) -> tuple[float, float, float, int]:
    """(first audio s, whole piece s, audio s, chunks)."""
    t0 = time.perf_counter()
    first, samples, chunks = None, 0, 0
    async for chunk in service.synthesize_async(text, ticket=WorkTicket(Urgency.COMMITTED, label="bench")):
        first = first if first is not None else time.perf_counter() - t0
        samples += len(chunk)
        chunks += 1
    whole = time.perf_counter() - t0
    return (first if first is not None else whole), whole, samples / service.sample_rate, chunks


async def run(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="sub300-bench-tts-") as scratch:
        build = builders(args, Path(scratch))
        services: dict[str, ScheduledSynthesizer] = {}
        for name in names:
            if name not in build:
                raise SystemExit(f"unknown engine {name!r}: {', '.join(build)}")
            try:
                engine = build[name]()
            except Exception as exc:  # a missing extra or model: say so, bench the others
                print(f"# {name}: not benchmarked: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            services[name] = ScheduledSynthesizer(engine, workers=1)
            for _ in range(2):
                list(engine.synthesize("Warm up, please."))
        results: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in services}
        for rep in range(args.reps):
            for i, text in enumerate(PIECES):
                order = list(services) if (rep + i) % 2 == 0 else list(reversed(services))
                for name in order:
                    results[name].append(await one_piece(services[name], text))
    print(f"# TTS engines, {len(PIECES)} pieces x {args.reps} reps, one at a time, device {args.device}, "
          f"{args.threads} CPU threads — {describe_machine()}")
    print("| engine | rate (Hz) | first audio p50 (ms) | p95 (ms) | whole piece p50 (ms) | RTF p50 | chunks/piece |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        firsts = [r[0] * 1000 for r in rows]
        wholes = [r[1] * 1000 for r in rows]
        rtfs = [r[1] / r[2] for r in rows if r[2] > 0]
        chunks = sum(r[3] for r in rows) / len(rows)
        print(f"| {LABELS[name]} | {services[name].sample_rate} | {percentile(firsts, 50):.1f} | "
              f"{percentile(firsts, 95):.1f} | {percentile(wholes, 50):.1f} | {percentile(rtfs, 50):.3f} | {chunks:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="piper,coqui-tiny-vits,coqui-tiny-xtts",
                        help="comma-separated: piper, coqui-tiny-vits, coqui-tiny-xtts, coqui")
    parser.add_argument("--coqui-model", default="", help="engine coqui: a Coqui model folder or downloaded name")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per synthesis (Piper ONNX, PyTorch)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if "coqui" in args.engines.split(",") and not args.coqui_model:
        parser.error("engine coqui needs --coqui-model")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
