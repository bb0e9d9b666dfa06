#!/usr/bin/env python3
"""LLM time to first token with and without the cached system prompt (CTranslate2 ``static_prompt``).

Two instances of the embedded model on the same weights, one with the
system prompt pinned (`CTranslate2ChatModel.pin_system_prompt`: its
prefix's decoder state cached), one without; each question goes to both,
alternating in one run, so both share the machine's state.  Also counts the
greedy answers that are identical (they must all be).

    .venv/bin/python scripts/bench_llm_prefix.py --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_turns import QUESTIONS
from machine_info import describe_machine, percentile

from sub300.agent.config import load_config
from sub300.agent.engines import embedded_llm_dir
from sub300.models.llm_ct2 import CTranslate2ChatModel


async def first_token(llm: CTranslate2ChatModel, messages: list, max_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    first = None
    text = []
    async for piece in llm.stream_chat(messages, max_tokens=max_tokens):
        if first is None and piece:
            first = (time.perf_counter() - start) * 1000
        text.append(piece)
    return first or float("nan"), "".join(text)


async def main_async(args) -> None:
    config = load_config(args.config)
    model_dir = embedded_llm_dir(config)
    system = config.llm.system_prompt
    variants = {label: CTranslate2ChatModel(model_dir, device=config.llm.device, compute_type=config.llm.compute_type,
                                            threads=config.llm.threads)
                for label in ("cached system prompt", "full prefill")}
    llm = variants["cached system prompt"]
    llm.pin_system_prompt(system)
    for model in variants.values():
        await first_token(model, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], 4)
    times: dict[str, list[float]] = {label: [] for label in variants}
    same = total = 0
    for _ in range(args.rounds):
        for question, _keys in QUESTIONS:
            answers = []
            for label, model in variants.items():
                ms, text = await first_token(model, [{"role": "system", "content": system},
                                                     {"role": "user", "content": question}], args.max_tokens)
                times[label].append(ms)
                answers.append(text)
            total += 1
            same += answers[0] == answers[1]
    for model in variants.values():
        await model.aclose()
    print(f"LLM time to first token — {describe_machine()}")
    print(f"{llm.name} on {llm.device}, threads {llm.threads}; {len(QUESTIONS)} questions x {args.rounds}; "
          f"static rounds {llm.scheduler.static_rounds} of {llm.scheduler.rounds}\n")
    print("| prompt | p50 (ms) | p95 (ms) |\n|---|---:|---:|")
    for label, values in times.items():
        print(f"| {label} | {percentile(values, 50):.0f} | {percentile(values, 95):.0f} |")
    print(f"\ngreedy answers identical: {same} of {total}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--config")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
