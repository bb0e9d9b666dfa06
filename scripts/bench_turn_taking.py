#!/usr/bin/env python3
"""Turn-taking benchmark: barge-in reaction time, and voice-to-voice with speculation on/off.

Barge-in: a caller asks for a story, waits until the agent is audible plus a
random 0.4–1.4 s, then interrupts; reaction = the caller's voice onset (first
voiced audio at the server) → the first silent frame the transport sends.

Speculation: the same recorded questions played to the conversation with
`llm.speculate` on and off, interleaved question by question in one process,
at the configured hangover and at a longer one.

    .venv/bin/python scripts/bench_turn_taking.py --barge-ins 8 --questions 8
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from bench_turns import QUESTIONS
from machine_info import describe_machine, percentile

from sub300.agent.audio import resample
from sub300.agent.config import load_config
from sub300.agent.engines import load_engines, warm_up
from sub300.agent.events import TurnFinished
from sub300.testing.scripted_caller import ScriptedCaller

STORY = "Tell me a long story about a brave knight and a dragon."
INTERRUPTIONS = ["Stop. What is the capital of France?", "Wait, how many days are in a week?",
                 "Sorry, what color is the sky?", "Hold on, who wrote Romeo and Juliet?"]


def speak(tts, text: str) -> np.ndarray:
    return resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, 16000)


async def barge_in_trials(engines, config, n: int, rng: random.Random) -> tuple[list[float], int]:
    story = speak(engines.tts, STORY)
    reactions, committed = [], 0
    for i in range(n):
        interruption = speak(engines.tts, INTERRUPTIONS[i % len(INTERRUPTIONS)])
        caller = ScriptedCaller(engines, config)
        try:
            await caller.silence(0.5)
            await caller.say(story)
            await caller.wait_until(lambda c=caller: c.playout.audible, timeout=60)
            await caller.silence(rng.uniform(0.4, 1.4))
            if not caller.playout.audible:
                print(f"# trial {i + 1}: the agent had finished before the interruption; skipped", file=sys.stderr)
                continue
            await caller.say(interruption)
            await caller.until_idle(timeout=60)
        finally:
            await caller.close()
        conv = caller.conversation
        reactions += conv.barge_in_reactions[:1]
        first = [e for e in caller.events if isinstance(e, TurnFinished)][:1]
        committed += bool(first and first[0].ledger.notes.get("interrupted"))
        print(f"# barge-in {i + 1}: reaction {conv.barge_in_reactions[:1]} s, interrupted={committed}", file=sys.stderr)
    return reactions, committed


async def speculation_runs(engines, base, n: int, hangovers: list[int]) -> dict[str, list]:
    questions = [speak(engines.tts, q) for q, _ in (QUESTIONS * 2)[:n]]
    results: dict[str, list] = {}
    for pcm in questions:
        for hangover in hangovers:
            for speculate in (True, False):
                config = copy.deepcopy(base)
                config.vad.hangover_ms = hangover
                config.llm.speculate = speculate
                caller = ScriptedCaller(engines, config)
                try:
                    await caller.silence(0.5)
                    await caller.say(pcm)
                    await caller.until_idle(timeout=60)
                finally:
                    await caller.close()
                label = f"hangover {hangover} ms, speculation {'on' if speculate else 'off'}"
                results.setdefault(label, []).extend(
                    e.ledger for e in caller.events if isinstance(e, TurnFinished))
    return results


async def main_async(args) -> None:
    config = load_config(args.config)
    config.stt.partial_interval_ms = 0
    engines = load_engines(config, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, config)
    reactions, committed = await barge_in_trials(engines, config, args.barge_ins, random.Random(1))
    spec = await speculation_runs(engines, config, args.questions, [config.vad.hangover_ms, args.long_hangover])
    await engines.aclose()
    print(f"Turn-taking benchmark — {describe_machine()}")
    print(f"engines: {engines.describe()}; interrupt.onset_ms {config.interrupt.onset_ms}\n")
    ms = [r * 1000 for r in reactions]
    print("| barge-in | trials | interrupted | reaction p50 (ms) | p95 (ms) |\n|---|---:|---:|---:|---:|")
    print(f"| caller onset → agent silent | {len(ms)} | {committed} | {percentile(ms, 50):.0f} | {percentile(ms, 95):.0f} |\n")
    print("| variant | turns | speculative | voice-to-voice p50 (ms) | p95 (ms) |\n|---|---:|---:|---:|---:|")
    for label, ledgers in spec.items():
        v2v = [ledger.voice_to_voice_ms for ledger in ledgers if ledger.voice_to_voice_ms is not None]
        used = sum(bool(ledger.notes.get("speculative")) for ledger in ledgers)
        print(f"| {label} | {len(ledgers)} | {used} | {percentile(v2v, 50):.0f} | {percentile(v2v, 95):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--barge-ins", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--long-hangover", type=int, default=600)
    parser.add_argument("--config")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
