#!/usr/bin/env python3
"""How short may the first spoken piece be?  Latency and listening checks per cut.

For each question (the spoken questions of scripts/bench_turns.py, as text)
and each first-piece cut N (`tts.first_piece_max_words`; 0 = no word cut:
the first clause or sentence), in one run, interleaved question by question:

* **first audio** -- live: the embedded LLM streams the answer into the
  `SentenceSplitter` until the first piece is complete, then Piper
  synthesizes that piece; the time from the LLM request to Piper's first
  audio chunk (the `llm_first_token` + `first_piece` + `tts_first_audio`
  stages of a turn, without the endpointing and STT before them);
* **words** -- the whole greedy answer (generated once per question) is cut
  into pieces by the splitter with that N, each piece synthesized on its
  own as the reply does, the pieces' audio joined back to back as the
  playout plays them, transcribed with the bundled Whisper, and scored
  against the words Piper was given (WER, Whisper's normaliser; the row
  ``whole answer`` synthesizes the answer in one call: the voice's and the
  recogniser's own error);
* **seam** -- a prosody proxy: the silence (10 ms blocks 40 dB under the
  answer's peak) between the first piece's last voiced block and the second
  piece's first, i.e. the pause the caller hears where the first piece was
  cut, as the reply plays it (agent/reply.py trims a piece cut inside a
  sentence to `SEAM_KEEP_MS` of silence; ``--untrimmed`` adds rows
  without).  Piper closes every piece as an utterance (final lengthening,
  150-220 ms of trailing silence); a pause where nobody would pause is what
  a cut that is too early sounds like;
* **silence heard** -- live: the seam as the caller hears it, the seam's
  silence plus any wait for the second piece after the first has played
  out (a short first piece leaves the LLM and Piper less time to make the
  rest of the sentence).

    .venv/bin/python scripts/bench_first_piece.py --questions 12 --cuts 0,2,3,4,6
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from bench_turns import QUESTIONS
from machine_info import describe_machine, percentile

from sub300.agent.audio import int16_to_float32, resample
from sub300.agent.config import load_config
from sub300.agent.engines import load_engines, warm_up
from sub300.agent.reply import _PAUSE_END, trim_trailing_silence
from sub300.agent.sentences import SentenceSplitter
from sub300.agent.spoken_form import spoken_form
from sub300.testing.wer import word_errors

BLOCK_S = 0.01          # level blocks for the seam
SILENCE_DROP_DB = 40.0  # a block this far under the answer's peak is silence


def pieces_of(stream_text: list[str], min_clause_chars: int, cut: int) -> list[str]:
    splitter = SentenceSplitter(min_clause_chars, cut)
    pieces: list[str] = []
    for text in stream_text:
        pieces += splitter.push(text)
    return pieces + splitter.flush()


def synthesize(tts, text: str) -> np.ndarray:
    chunks = list(tts.synthesize(spoken_form(text)))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def block_levels(pcm: np.ndarray, rate: int) -> np.ndarray:
    n = max(1, int(BLOCK_S * rate))
    blocks = len(pcm) // n
    x = pcm[: blocks * n].astype(np.float64).reshape(blocks, n) / 32768.0
    return 10 * np.log10(np.mean(x * x, axis=1) + 1e-12)


def seam_ms(first: np.ndarray, second: np.ndarray, rate: int) -> float:
    """Silence between the last voiced block of ``first`` and the first voiced block of ``second`` (ms)."""
    a, b = block_levels(first, rate), block_levels(second, rate)
    floor = max(a.max(initial=-120), b.max(initial=-120)) - SILENCE_DROP_DB
    voiced_a, voiced_b = np.flatnonzero(a >= floor), np.flatnonzero(b >= floor)
    if not len(voiced_a) or not len(voiced_b):
        return float("nan")
    return ((len(a) - 1 - voiced_a[-1]) + voiced_b[0]) * BLOCK_S * 1000


def as_played(piece: str, pcm: np.ndarray, rate: int, trim: bool) -> np.ndarray:
    """A piece's audio as the reply plays it: a piece cut inside a sentence loses its trailing silence."""
    return trim_trailing_silence(pcm, rate) if trim and not _PAUSE_END.search(piece) else pcm


async def live(engines, messages, settings, cut: int, trim: bool) -> tuple[float, float, int, float | None]:
    """Live, as a reply does it: (LLM request → first piece, → Piper's first chunk) in ms, the first
    piece's words, and the silence the caller hears between the first piece's last sound and the
    second's first sound (ms: the first piece's trailing silence as played, any wait for the second
    piece after the first has played out, the second's leading silence; None without a second piece)."""
    splitter = SentenceSplitter(settings.tts.min_clause_chars, cut)
    rate = engines.tts.sample_rate
    start = time.perf_counter()
    pieces: list[str] = []
    times: list[float] = []
    first_pcm = np.zeros(0, np.int16)

    async def speak_first() -> np.ndarray:
        times.append(time.perf_counter())                     # the first piece is complete
        chunks = iter(engines.tts.synthesize(spoken_form(pieces[0])))
        first = await asyncio.to_thread(next, chunks, None)
        times.append(time.perf_counter())                     # its first audio
        rest = await asyncio.to_thread(list, chunks)
        return as_played(pieces[0], np.concatenate([c for c in [first, *rest] if c is not None]), rate, trim)

    stream = engines.llm.stream_chat(messages, max_tokens=settings.llm.max_tokens, temperature=0.0)
    try:
        async for text in stream:
            pieces += splitter.push(text)
            if pieces and not times:
                first_pcm = await speak_first()
            if len(pieces) >= 2:
                break
        else:
            pieces += splitter.flush()
            if pieces and not times:
                first_pcm = await speak_first()
    finally:
        await stream.aclose()
    if not times:
        return float("nan"), float("nan"), 0, None
    piece_ms, audio_ms, words = (times[0] - start) * 1000, (times[1] - start) * 1000, len(pieces[0].split())
    if len(pieces) < 2:
        return piece_ms, audio_ms, words, None
    plays_until = times[1] + len(first_pcm) / rate
    second = iter(engines.tts.synthesize(spoken_form(pieces[1])))
    second_first = await asyncio.to_thread(next, second, None)
    second_at = time.perf_counter()
    second_pcm = np.concatenate([c for c in [second_first, *await asyncio.to_thread(list, second)] if c is not None])
    wait_ms = max(0.0, second_at - plays_until) * 1000
    return piece_ms, audio_ms, words, seam_ms(first_pcm, second_pcm, rate) + wait_ms


async def main_async(args) -> None:
    config = load_config(args.config)
    cuts = [int(c) for c in args.cuts.split(",")]
    trims = [True, False] if args.untrimmed else [True]
    engines = load_engines(config, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, config)
    pin = getattr(engines.llm, "pin_system_prompt", None)
    if pin is not None:
        pin(config.llm.system_prompt)
    rate = engines.tts.sample_rate
    rows: dict[str, dict[str, list[float]]] = {
        label: {"piece": [], "audio": [], "words": [], "seam": [], "gap": [], "errors": [], "ref": []}
        for label in [f"N={c}{'' if trim else ', untrimmed'}" for c in cuts for trim in trims] + ["whole answer"]}
    questions = (QUESTIONS * (1 + args.questions // len(QUESTIONS)))[: args.questions]
    for i, (question, _keys) in enumerate(questions):
        messages = [{"role": "system", "content": config.llm.system_prompt}, {"role": "user", "content": question}]
        stream_text = [t async for t in engines.llm.stream_chat(messages, max_tokens=config.llm.max_tokens)]
        answer = "".join(stream_text)
        whole = pieces_of(stream_text, config.tts.min_clause_chars, 0)
        reference = " ".join(spoken_form(p) for p in whole)
        for cut, trim in [(c, t) for c in cuts for t in trims]:
            row = rows[f"N={cut}{'' if trim else ', untrimmed'}"]
            piece_ms, audio_ms, words, gap = await live(engines, messages, config, cut, trim)
            row["piece"].append(piece_ms)
            row["audio"].append(audio_ms)
            row["words"].append(words)
            if gap is not None:
                row["gap"].append(gap)
            pieces = pieces_of(stream_text, config.tts.min_clause_chars, cut)
            audios = [await asyncio.to_thread(synthesize, engines.tts, p) for p in pieces]
            audios = [as_played(p, a, rate, trim) if k < len(pieces) - 1 else a
                      for k, (p, a) in enumerate(zip(pieces, audios, strict=True))]
            if len(audios) > 1:
                row["seam"].append(seam_ms(audios[0], audios[1], rate))
            heard = await asyncio.to_thread(engines.stt.transcribe, int16_to_float32(
                resample(np.concatenate(audios), rate, 16000)))
            errors, total = word_errors(reference, heard.text)
            row["errors"].append(errors)
            row["ref"].append(total)
            print(f"# q{i + 1} N={cut}: first piece {pieces[0]!r} ({words} words) audio {audio_ms:.0f} ms; "
                  f"heard {heard.text!r}", file=sys.stderr)
        audio = await asyncio.to_thread(synthesize, engines.tts, answer)
        heard = await asyncio.to_thread(engines.stt.transcribe, int16_to_float32(resample(audio, rate, 16000)))
        errors, total = word_errors(reference, heard.text)
        rows["whole answer"]["errors"].append(errors)
        rows["whole answer"]["ref"].append(total)
    await engines.aclose()
    print(f"First spoken piece — {describe_machine()}")
    print(f"engines: {engines.describe()}; {len(questions)} questions; tts.min_clause_chars "
          f"{config.tts.min_clause_chars}; llm max_tokens {config.llm.max_tokens}\n")
    print("| first piece cut | words in the first piece p50 | first piece p50 / p95 (ms) | "
          "first audio p50 / p95 (ms) | seam in the audio p50 / p95 (ms) | silence heard at the seam, live: "
          "p50 / p95 (ms) | WER heard back |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        wer = 100 * sum(row["errors"]) / max(1, sum(row["ref"]))
        if not row["audio"]:
            print(f"| {label} | | | | | | {wer:.1f} % |")
            continue
        gaps = row["gap"]
        print(f"| {label} | {percentile(row['words'], 50):.0f} | {percentile(row['piece'], 50):.0f} / "
              f"{percentile(row['piece'], 95):.0f} | {percentile(row['audio'], 50):.0f} / "
              f"{percentile(row['audio'], 95):.0f} | {percentile(row['seam'], 50):.0f} / "
              f"{percentile(row['seam'], 95):.0f} | {percentile(gaps, 50):.0f} / {percentile(gaps, 95):.0f} "
              f"| {wer:.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--cuts", default="0,2,3,4,6", help="first_piece_max_words values (0: clause/sentence only)")
    parser.add_argument("--untrimmed", action="store_true",
                        help="also each cut without trimming the silence after a piece cut inside a sentence")
    parser.add_argument("--config")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
