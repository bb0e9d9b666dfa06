#!/usr/bin/env python3
"""Turn latency through the paced file path: p50/p95 per stage and voice-to-voice.

Two turn sets (``--set``):

* ``questions`` -- short spoken questions (Piper, made here);
* ``passages`` -- longer read speech: real recorded Asterisk prompts of 3 to 7 s
  (Debian's asterisk-core-sounds, one speaker, fetched and decoded by
  scripts/bench_asr.py into ~/.cache/sub300/asterisk), spread evenly over the
  sorted prompt names.

Each turn's audio (0.5 s of silence, the speech, 1 s of silence) is played to
a fresh conversation in real time on the process's shared engines, exactly
like `sub300 converse`, and its ledger is collected; the transcript is scored
against the text (WER, Whisper's normaliser).  Variants given with --compare
run in the same process on the same audio, interleaved turn by turn, so they
share the machine's state.

    .venv/bin/python scripts/bench_turns.py --questions 10
    .venv/bin/python scripts/bench_turns.py --set passages --questions 12
    .venv/bin/python scripts/bench_turns.py --compare stt.early_final=true,false
    .venv/bin/python scripts/bench_turns.py --compare sub300.agent.transcription.SILENCE_ONSET_MS=0,40

A key that starts with ``sub300.`` names a module constant (a default not in
the configuration, or a switch kept for comparisons): each variant runs with
it set to its value.  ``--variant`` sets several keys at once, e.g. the
state before issue 11's compute-path work against now:

    .venv/bin/python scripts/bench_turns.py --questions 12 \
        --variant "before:sub300.agent.transcription.START_BEFORE_TAIL=false;sub300.models.llm_ct2.STATIC_PROMPTS=false;sub300.agent.reply.SEAM_KEEP_MS=100000;tts.first_piece_max_words=6" \
        --variant "now:"
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from machine_info import describe_machine, percentile

from sub300.agent.audio import resample
from sub300.agent.config import load_config, override
from sub300.agent.engines import load_engines, warm_up
from sub300.agent.ledger import STAGES
from sub300.media.file_transport import converse_with_file
from sub300.testing.wer import word_errors

QUESTIONS = [
    ("What is the capital of France?", {"capital", "france"}),
    ("How many days are in a week?", {"days", "week"}),
    ("What color is the sky on a clear day?", {"color", "sky"}),
    ("Can you recommend a good book?", {"recommend", "book"}),
    ("What is two plus two?", {"two", "plus"}),
    ("Tell me a fun fact about cats.", {"fact", "cats"}),
    ("What is the largest ocean on Earth?", {"largest", "ocean"}),
    ("How do I boil an egg?", {"boil", "egg"}),
    ("What time zone is London in?", {"time", "london"}),
    ("Why do leaves change color in autumn?", {"leaves", "autumn"}),
    ("Who wrote Romeo and Juliet?", {"wrote", "romeo"}),
    ("What is the speed of light?", {"speed", "light"}),
]


def speak_questions(tts, n: int) -> list[tuple[str, set[str], np.ndarray]]:
    out = []
    for text, keys in (QUESTIONS * (1 + n // len(QUESTIONS)))[:n]:
        pcm = resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, 16000)
        lead, tail = np.zeros(8000, np.int16), np.zeros(16000, np.int16)
        out.append((text, keys, np.concatenate([lead, pcm, tail])))
    return out


def read_passages(n: int) -> list[tuple[str, set[str], np.ndarray]]:
    """``n`` Asterisk prompts of 3 to 7 s, evenly spread over the sorted names (the same ones every run)."""
    import bench_asr

    clips = [c for c in bench_asr.load_clips(bench_asr.ensure_data(bench_asr.DEFAULT_DATA_DIR), None)
             if 3.0 <= c.seconds <= 7.0]
    step = max(1, len(clips) // max(1, n))
    out: list[tuple[str, set[str], np.ndarray]] = []
    for clip in clips[::step][:n]:
        pcm = np.clip(clip.audio * 32767, -32768, 32767).astype(np.int16)
        lead, tail = np.zeros(8000, np.int16), np.zeros(16000, np.int16)
        out.append((clip.reference, set(), np.concatenate([lead, pcm, tail])))
    return out


def _setting(base, key: str, value: str, patches: list):
    """Apply one KEY=VALUE to ``base`` (a config key SECTION.KEY) or to ``patches`` (a module constant
    sub300.MODULE.NAME, converted to the constant's type); returns the config."""
    if key.startswith("sub300."):
        module_name, _, name = key.rpartition(".")
        module = importlib.import_module(module_name)
        old = getattr(module, name)
        converted = (value.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(value)
        patches.append((module, name, converted))
        return base
    section, _, name = key.partition(".")
    return override(base, {section: {name: value}} if name else {section: value}, origin="--compare")


def variant_configs(base, compare: str | None, variants_spec: list[str] | None = None):
    """[(label, config, patches)]: ``patches`` are (module, constant name, value) set for that variant.

    ``compare``: KEY=V1,V2 (one key, several values); ``variants_spec``: LABEL:KEY=V[;KEY=V...] each."""
    variants: list[tuple[str, object, list]] = []
    for spec in variants_spec or []:
        label, _, settings = spec.partition(":")
        config = base
        patches: list[tuple] = []
        for setting in filter(None, settings.split(";")):
            key, _, value = setting.partition("=")
            config = _setting(config, key.strip(), value.strip(), patches)
        variants.append((label, config, patches))
    if compare:
        key, _, values = compare.partition("=")
        for value in values.split(","):
            patches = []
            config = _setting(base, key, value, patches)
            variants.append((f"{key.rpartition('.')[2] if key.startswith('sub300.') else key}={value}", config, patches))
    return variants or [("default", base, [])]


@contextlib.contextmanager
def patched(patches):
    """Set module constants for one variant's call (``patches``: [(module, name, value)])."""
    old = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(old):
            setattr(module, name, value)


def summarize(label: str, ledgers: list, heard: int, total: int, errors: tuple[int, int] = (0, 0)) -> str:
    rows = []
    columns = [stage for stage, _ in STAGES]
    for stage in columns:
        vals = [ledger.stages_ms().get(stage) for ledger in ledgers if stage in ledger.stages_ms()]
        rows.append((stage, vals))
    extra = {
        "(stt engine time)": [ledger.notes.get("stt_inference_ms") for ledger in ledgers if ledger.notes.get("stt_inference_ms")],
        "(llm first token)": [ledger.between_ms("llm_start", "llm_first_token") for ledger in ledgers if ledger.between_ms("llm_start", "llm_first_token") is not None],
        "(tts first audio)": [ledger.between_ms("tts_start", "tts_first_audio") for ledger in ledgers if ledger.between_ms("tts_start", "tts_first_audio") is not None],
        "(stt start after the end of speech)": [ledger.between_ms("speech_end", "stt_start") for ledger in ledgers],
        "(stt before endpoint)": [ledger.overlaps_ms().get("stt_before_endpoint", 0.0) for ledger in ledgers],
    }
    rows += list(extra.items())
    rows.append(("**voice_to_voice**", [ledger.voice_to_voice_ms for ledger in ledgers if ledger.voice_to_voice_ms is not None]))
    wer = f", transcript WER {100 * errors[0] / errors[1]:.1f} % ({errors[0]}/{errors[1]} words)" if errors[1] else ""
    gaps = sum(1 for ledger in ledgers if ledger.notes.get("gaps"))
    wer += f"; turns whose audio ran out mid-answer (ledger note gaps): {gaps}"
    lines = [f"\n### {label}: {len(ledgers)} turns answered of {total}, key words heard in {heard}{wer}\n",
             "| stage (critical path, ms) | p50 | p95 |", "|---|---:|---:|"]
    for name, vals in rows:
        vals = [v for v in vals if v is not None]
        lines.append(f"| {name} | {percentile(vals, 50):.0f} | {percentile(vals, 95):.0f} |")
    return "\n".join(lines)


async def main_async(args) -> None:
    base = load_config(args.config)
    variants = variant_configs(base, args.compare, args.variant)
    engines = load_engines(base, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, base)
    questions = (speak_questions(engines.tts, args.questions) if args.set == "questions"
                 else read_passages(args.questions))
    results: dict[str, tuple[list, int]] = {label: ([], 0) for label, _, _ in variants}
    errors = {label: [0, 0] for label, _, _ in variants}
    for i, (text, keys, pcm) in enumerate(questions):
        for label, config, patch in variants:
            with patched(patch):
                _, finished = await converse_with_file(engines, config, pcm)
            ledgers, heard = results[label]
            for turn in finished:
                ledgers.append(turn.ledger)
                words = set(re.findall(r"[a-z0-9']+", turn.transcript.lower()))
                heard += bool(keys) and keys <= words
                wrong, total = word_errors(text, turn.transcript)
                errors[label][0] += wrong
                errors[label][1] += total
                v2v = turn.ledger.voice_to_voice_ms
                print(f"# [{label}] q{i + 1} {turn.transcript!r} -> {turn.reply[:60]!r} "
                      f"v2v {v2v if v2v is None else round(v2v)} ms", file=sys.stderr)
            results[label] = (ledgers, heard)
    await engines.aclose()
    print(f"Turn latency, paced file path — {describe_machine()}")
    print(f"set {args.set}: {len(questions)} turns; engines: {engines.describe()}; hangover {base.vad.hangover_ms} ms; "
          f"stt padding {base.stt.padding}; llm max_tokens {base.llm.max_tokens}")
    for label, _, _ in variants:
        ledgers, heard = results[label]
        print(summarize(label, ledgers, heard, len(questions), (errors[label][0], errors[label][1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=10, help="turns to play (of either set)")
    parser.add_argument("--set", choices=("questions", "passages"), default="questions")
    parser.add_argument("--config")
    parser.add_argument("--compare", help="SECTION.KEY=V1,V2: run each value on the same audio in one run")
    parser.add_argument("--variant", action="append",
                        help="LABEL:KEY=V[;KEY=V...] (repeatable): a variant setting several keys at once")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
