#!/usr/bin/env python3
"""End of turn on real speech with real pauses: VAD-only (fixed hangover) against the adaptive detector.

Data: Debian's Asterisk prompts (one speaker, recorded speech; scripts/bench_asr.py
fetches them into ~/.cache/sub300/asterisk), single-sentence prompts only:

* **complete** — each prompt as it is;
* **hesitation** — the same prompt split at a word boundary in its middle
  with a 300–700 ms silence inserted (uniform, seeded).  The boundary is
  found from the audio: the longest quiet run (35 dB under the clip's peak)
  in the middle of the clip that Whisper tiny.en (faster-whisper, run here
  once per clip and cached) hears as the clip's words split in two — a stop
  consonant's closure is quiet too, but cutting there breaks a word, which
  that check rejects.  A clip with no such boundary has no hesitation item.

Every clip is played through the real conversation (paced file path, real
engines, like scripts/bench_turns.py) for each variant, in ONE run, the
variants interleaved clip by clip (order rotated): ``vad`` (turn.detector =
"vad", vad.hangover_ms = --vad-hangover-ms) and ``adaptive`` (turn.detector =
"smart-turn" with --complete-ms / --incomplete-ms).

A clip is **cut off** when its first turn ended before the clip's last word
began: the first turn's true end of speech (ledger ``speech_end``, mapped to
the clip's samples through the first frame's arrival time) lies more than
50 ms before the last word's start, or the clip produced more than one turn.
Voice-to-voice p50/p95 are over the turns that were not cut off; "sentence
end to answer" is, for every clip, the voice-to-voice of its last turn (the
one holding the last word): after a cut-off, the answer to the rest of the
sentence, which comes after the agent was interrupted.

    .venv/bin/python scripts/bench_end_of_turn.py               # 8 prompts x 2 sets x 2 variants, ~6 min
    .venv/bin/python scripts/bench_end_of_turn.py --sweep --clips 16   # offline: hangover grid, ~1 min
    .venv/bin/python scripts/bench_end_of_turn.py --clips 4 --complete-ms 100
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from bench_asr import DEFAULT_DATA_DIR, Clip, ensure_data, load_clips
from machine_info import describe_machine, percentile

from sub300.agent.config import load_config, override
from sub300.agent.conversation import Conversation
from sub300.agent.engines import load_engines, warm_up
from sub300.agent.events import TurnFinished
from sub300.agent.playout import PlayoutQueue
from sub300.media.file_transport import FileCall
from sub300.models.protocols import SAMPLE_RATE

LEAD_S, TAIL_S = 0.5, 1.0
CUT_MARGIN_S = 0.05
WORDS_CACHE = "last-word-tiny.en.json"


@dataclass
class Item:
    name: str
    kind: str                 # "complete" | "hesitation"
    text: str
    audio: np.ndarray         # int16 16 kHz, with lead and tail silence
    last_word_start: int      # sample (in `audio`) where the last word begins
    pause_s: float = 0.0      # the inserted hesitation


@dataclass
class Outcome:
    item: Item
    turns: list[TurnFinished]
    cut_off: bool
    v2v_ms: float | None       # the turn's voice-to-voice, when it was not cut off
    answer_ms: float | None    # the caller's whole sentence: its end to the agent's next audio (the last turn's v2v)
    notes: dict = field(default_factory=dict)


# ------------------------------------------------------------------ data
def single_sentences(clips: list[Clip]) -> list[Clip]:
    """Prompts that are one sentence of 6+ words, 1.5–6 s long, spread over the whole list (every k-th by name)."""
    out = []
    for clip in clips:
        text = clip.reference.strip()
        words = text.split()
        if (len(words) >= 6 and 1.5 <= clip.seconds <= 6.0 and text[-1] in ".?!"
                and not re.search(r"[.?!]\s", text[:-1]) and "..." not in text):
            out.append(clip)
    return out[::3] + out[1::3] + out[2::3]      # not the first letters of the alphabet only


BLOCK = SAMPLE_RATE // 100     # 10 ms
GAP_DROP_DB = 35.0             # a block this far below the clip's loudest is quiet
CUTS_CACHE = "hesitation-cuts-tiny.en.json"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def quiet_runs(audio: np.ndarray) -> list[tuple[int, int]]:
    """(length in 10 ms blocks, centre sample) of each run of quiet blocks, longest first."""
    levels = 10 * np.log10(np.array([np.mean(audio[k:k + BLOCK] ** 2) for k in range(0, len(audio) - BLOCK, BLOCK)])
                           + 1e-12)
    quiet = np.concatenate([levels < levels.max() - GAP_DROP_DB, [False]])
    runs, start = [], None
    for b, q in enumerate(quiet):
        if q and start is None:
            start = b
        elif not q and start is not None:
            runs.append((b - start, (start + b) * BLOCK // 2))
            start = None
    return sorted(runs, reverse=True)


def hesitation_cuts(clips: list[Clip], cache: Path) -> dict[str, int | None]:
    """Per clip, the sample of a word boundary inside the sentence where a hesitation goes (None: none found).

    Candidates are the quiet runs of the clip's middle (30–75 % of its voiced span), longest first; a
    candidate is a word boundary when Whisper (tiny.en, via faster-whisper) hears the two parts as the
    whole clip's words split in two, each part with 2+ words.  A stop consonant's closure is quiet too,
    but a cut there breaks a word, which this check rejects.  Cached in ``cache``.
    """
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [c for c in clips if c.name not in known]
    if todo:
        from faster_whisper import WhisperModel

        from sub300.models.bundled import resolve_bundled

        model = WhisperModel(str(resolve_bundled("bundled:whisper-tiny.en")), device="cpu", compute_type="int8",
                             cpu_threads=2)

        def heard(audio: np.ndarray) -> list[str]:
            segments, _ = model.transcribe(audio, language="en", beam_size=1, without_timestamps=True)
            return _words(" ".join(s.text for s in segments))

        for clip in todo:
            whole = heard(clip.audio)
            loud = np.flatnonzero(np.abs(clip.audio) > 10 ** (-GAP_DROP_DB / 20) * np.abs(clip.audio).max())
            first, last = (int(loud[0]), int(loud[-1])) if len(loud) else (0, len(clip.audio))
            lo, hi = first + 0.30 * (last - first), first + 0.75 * (last - first)
            known[clip.name] = None
            for length, centre in quiet_runs(clip.audio):
                if length < 2 or not lo <= centre <= hi:
                    continue
                a, b = heard(clip.audio[:centre]), heard(clip.audio[centre:])
                if len(a) >= 2 and len(b) >= 2 and a + b == whole:
                    known[clip.name] = int(centre)
                    break
        cache.write_text(json.dumps(known))
    return {c.name: known[c.name] for c in clips}


def last_word_starts(clips: list[Clip], cache: Path) -> dict[str, float]:
    """Seconds at which each clip's last word begins (faster-whisper word timestamps, tiny.en), cached."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [c for c in clips if c.name not in known]
    if todo:
        from faster_whisper import WhisperModel

        from sub300.models.bundled import resolve_bundled

        model = WhisperModel(str(resolve_bundled("bundled:whisper-tiny.en")), device="cpu", compute_type="int8",
                             cpu_threads=2)
        for clip in todo:
            segments, _ = model.transcribe(clip.audio, language="en", word_timestamps=True, beam_size=1)
            words = [w for s in segments for w in (s.words or [])]
            known[clip.name] = words[-1].start if words else clip.seconds
        cache.write_text(json.dumps(known))
    return {c.name: float(known[c.name]) for c in clips}


def to_pcm(audio: np.ndarray) -> np.ndarray:
    return np.clip(audio * 32767, -32768, 32767).astype(np.int16)


def build_items(clips: list[Clip], last_words: dict[str, float], cuts: dict[str, int | None],
                seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    lead, tail = np.zeros(int(LEAD_S * SAMPLE_RATE), np.int16), np.zeros(int(TAIL_S * SAMPLE_RATE), np.int16)
    items = []
    for clip in clips:
        pcm = to_pcm(clip.audio)
        last_start = int(last_words[clip.name] * SAMPLE_RATE)
        items.append(Item(clip.name, "complete", clip.reference, np.concatenate([lead, pcm, tail]),
                          len(lead) + last_start))
        cut = cuts[clip.name]
        if cut is None:
            print(f"# {clip.name}: no word boundary verified in its middle: no hesitation item", file=sys.stderr)
            continue
        pause_s = float(rng.uniform(0.3, 0.7))
        gap = np.zeros(int(pause_s * SAMPLE_RATE), np.int16)
        items.append(Item(clip.name, "hesitation", clip.reference,
                          np.concatenate([lead, pcm[:cut], gap, pcm[cut:], tail]),
                          len(lead) + len(gap) + last_start, pause_s))
    return items


# ------------------------------------------------------------------ offline sweep
@dataclass
class Pause:
    end: int                  # the true end of speech (sample)
    detected: int             # the sample at which the endpointer reported the pause
    resumed: int | None       # where speech came back (None: it did not)
    p: float                  # the model's P(complete) at the pause


def pauses_of(item: Item, engines, config) -> list[Pause]:
    """Every pause the endpointer finds in the clip (no hangover ends the turn), each scored."""
    from sub300.agent.endpointing import Endpointer, SpeechPaused, SpeechResumed, SpeechStarted

    ep = Endpointer(engines.vad, min_speech_ms=config.vad.min_speech_ms, hangover_ms=60_000,
                    relative=config.vad.relative_end)
    start, out = 0, []
    pre_roll = config.vad.pre_roll_ms * SAMPLE_RATE // 1000
    for i in range(0, len(item.audio), 320):
        for event in ep.feed(item.audio[i:i + 320], (i + 320) / SAMPLE_RATE):
            if isinstance(event, SpeechStarted) and not out:
                start = max(0, event.sample - pre_roll)
            elif isinstance(event, SpeechPaused):
                audio = item.audio[start:i + 320].astype(np.float32) / 32768
                out.append(Pause(event.sample, i + 320, None, engines.turn.probability(audio)))
            elif isinstance(event, SpeechResumed) and out:
                out[-1].resumed = event.sample
    return out


def simulate(item: Item, pauses: list[Pause], policy: tuple[int, int, float], model_ms: float) -> tuple[bool, float]:
    """(cut off, endpointing ms) under ``policy`` = (complete ms, incomplete ms, threshold): each pause's
    hangover is the first when its P(complete) reaches the threshold (VAD-only: the same two hangovers)."""
    complete_ms, incomplete_ms, threshold = policy
    for pause in pauses:
        h = complete_ms if pause.p >= threshold else incomplete_ms
        silence = (pause.resumed - pause.end if pause.resumed is not None else 1e9) * 1000 / SAMPLE_RATE
        if silence >= h:
            delay = h if model_ms == 0 else max(h, (pause.detected - pause.end) * 1000 / SAMPLE_RATE + model_ms)
            return pause.end < item.last_word_start - CUT_MARGIN_S * SAMPLE_RATE, delay
    return False, float("nan")


def sweep(items: list[Item], engines, config, model_ms: float) -> None:
    """Cut-off rate and endpointing delay for a grid of settings, from the clips' pauses alone."""
    scored = [(item, pauses_of(item, engines, config)) for item in items]
    for item, ps in scored:
        print(f"# {item.kind:10s} {item.name}: " + ", ".join(
            f"[{p.end / SAMPLE_RATE:.2f} s: " + (f"{(p.resumed - p.end) / 16:.0f} ms" if p.resumed else "end")
            + f" p={p.p:.2f}]" for p in ps), file=sys.stderr)
    policies = [(f"vad {h}", (h, h, 0.5), 0.0) for h in (150, 200, 250, 300)]
    policies += [(f"adaptive {c}/{inc} thr {thr}", (c, inc, thr), model_ms)
                 for thr in (0.5, 0.7, 0.9) for c in (100, 150, 200, 250) for inc in (600, 800, 1000)]
    print("| policy | cut off: complete | hesitation | endpointing p50 / p95 (ms, not cut off) |")
    print("|---|---:|---:|---:|")
    for label, policy, ms in policies:
        sim = [(item.kind, *simulate(item, ps, policy, ms)) for item, ps in scored]
        cuts = {k: sum(c for kind, c, _ in sim if kind == k) for k in ("complete", "hesitation")}
        delays = [d for _, c, d in sim if not c and d == d]
        print(f"| {label} | {cuts['complete']} | {cuts['hesitation']} | "
              f"{percentile(delays, 50):.0f} / {percentile(delays, 95):.0f} |")


# ------------------------------------------------------------------ run
async def play(engines, config, item: Item) -> Outcome:
    """One clip through a fresh conversation on the shared engines (the file path, paced)."""
    playout = PlayoutQueue(engines.tts.sample_rate, time.monotonic)
    conversation = Conversation(engines, config, playout)
    first: list[float] = []
    push = conversation.push_frame

    def recording_push(frame):
        if not first:
            first.append(frame.timestamp)       # the arrival of sample len(frame) - 1
        push(frame)

    conversation.push_frame = recording_push    # type: ignore[method-assign]
    try:
        await FileCall(conversation, item.audio, max_tail_s=30.0).run()
    finally:
        await conversation.aclose()
    turns = list(conversation.finished)
    if not turns:
        return Outcome(item, turns, True, None, None)
    ledger = turns[0].ledger
    end_sample = 320 + (ledger.marks["speech_end"] - first[0]) * SAMPLE_RATE
    cut = len(turns) > 1 or end_sample < item.last_word_start - CUT_MARGIN_S * SAMPLE_RATE
    return Outcome(item, turns, cut, None if cut else ledger.voice_to_voice_ms, turns[-1].ledger.voice_to_voice_ms,
                   dict(ledger.notes))


def summarize(label: str, outcomes: list[Outcome]) -> list[str]:
    rows = []
    for kind in ("complete", "hesitation", "all"):
        chosen = [o for o in outcomes if kind in ("all", o.item.kind)]
        v2v = [o.v2v_ms for o in chosen if o.v2v_ms is not None]
        answer = [o.answer_ms for o in chosen if o.answer_ms is not None]
        endpointing = [o.turns[0].ledger.between_ms("speech_end", "endpoint") for o in chosen
                       if o.turns and not o.cut_off]
        stt = [o.turns[0].ledger.notes.get("stt_inference_ms") for o in chosen if o.turns]
        cut = sum(o.cut_off for o in chosen)
        rows.append(f"| {label} | {kind} | {len(chosen)} | {cut} ({100 * cut / max(1, len(chosen)):.0f} %) | "
                    f"{percentile(v2v, 50):.0f} / {percentile(v2v, 95):.0f} | "
                    f"{percentile(answer, 50):.0f} / {percentile(answer, 95):.0f} | "
                    f"{percentile([e for e in endpointing if e is not None], 50):.0f} | "
                    f"{percentile([x for x in stt if x is not None], 50):.0f} |")
    return rows


async def main_async(args) -> None:
    candidates = single_sentences(load_clips(ensure_data(args.data_dir), None))
    clips, cuts = [], {}
    for k in range(0, len(candidates), args.clips):      # until --clips prompts have a verified boundary
        batch = candidates[k:k + args.clips]
        cuts.update(hesitation_cuts(batch, args.data_dir / CUTS_CACHE))
        clips += [c for c in batch if cuts[c.name] is not None][:args.clips - len(clips)]
        if len(clips) >= args.clips:
            break
    last_words = last_word_starts(clips, args.data_dir / WORDS_CACHE)
    items = build_items(clips, last_words, cuts, args.seed)
    base = load_config(args.config)
    base = override(base, {"turn": {"detector": "smart-turn"}, **({"llm": {"max_tokens": args.max_tokens}}
                                                                      if args.max_tokens else {})}, origin="bench")
    variants = [
        (f"vad {args.vad_hangover_ms} ms", override(base, {"turn": {"detector": "vad"},
                                                           "vad": {"hangover_ms": args.vad_hangover_ms}})),
        (f"adaptive {args.complete_ms}/{args.incomplete_ms} ms",
         override(base, {"turn": {"detector": "smart-turn", "complete_hangover_ms": args.complete_ms,
                                  "incomplete_hangover_ms": args.incomplete_ms, "threshold": args.threshold}})),
    ]
    engines = load_engines(base, progress=lambda m: print(f"# {m}", file=sys.stderr))
    if args.sweep:
        print(f"End of turn, offline sweep over {len(items)} clips — {describe_machine()}")
        sweep(items, engines, base, args.model_ms)
        await engines.aclose()
        return
    await warm_up(engines, base)
    results: dict[str, list[Outcome]] = {label: [] for label, _ in variants}
    for i, item in enumerate(items):
        order = variants if i % 2 == 0 else variants[::-1]
        for label, config in order:
            outcome = await play(engines, config, item)
            results[label].append(outcome)
            n = outcome.notes
            print(f"# [{label}] {item.kind:10s} {item.name} pause {item.pause_s:.2f}s: {len(outcome.turns)} turn(s) "
                  f"{'CUT ' if outcome.cut_off else ''}v2v {outcome.v2v_ms or 0:.0f} ms "
                  f"p={n.get('turn_p', '-')} hangover {n.get('hangover_ms', '-')} by {n.get('hangover_by', '-')} "
                  f"{[t.transcript for t in outcome.turns]}", file=sys.stderr)
    await engines.aclose()
    print(f"End of turn, paced file path, Asterisk prompts — {describe_machine()}")
    print(f"engines: {engines.describe()}; {len(clips)} single-sentence prompts, each complete and with one "
          f"inserted 300–700 ms hesitation; llm.max_tokens {base.llm.max_tokens}; turn.threshold {args.threshold}\n")
    print("| variant | set | clips | cut off | voice-to-voice p50 / p95, not cut off (ms) | sentence end to answer "
          "p50 / p95, all (ms) | endpointing p50 (ms) | STT engine p50 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _ in variants:
        print("\n".join(summarize(label, results[label])))
    adaptive = results[variants[1][0]]
    by = Counter(o.notes.get("hangover_by", "-") for o in adaptive)
    model_ms = [o.notes["turn_model_ms"] for o in adaptive if "turn_model_ms" in o.notes]
    decision_ms = [o.notes["turn_decision_ms"] for o in adaptive if "turn_decision_ms" in o.notes]
    print(f"\nadaptive: hangover chosen by {dict(by)}; turn model inference p50 {percentile(model_ms, 50):.0f} ms, "
          f"p95 {percentile(model_ms, 95):.0f} ms; pause to decision p50 {percentile(decision_ms, 50):.0f} ms, "
          f"p95 {percentile(decision_ms, 95):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="single-sentence prompts (each played twice per variant)")
    parser.add_argument("--config")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--vad-hangover-ms", type=int, default=250)
    parser.add_argument("--complete-ms", type=int, default=None, help="default: turn.complete_hangover_ms")
    parser.add_argument("--incomplete-ms", type=int, default=None, help="default: turn.incomplete_hangover_ms")
    parser.add_argument("--threshold", type=float, default=None, help="default: turn.threshold")
    parser.add_argument("--max-tokens", type=int, default=16, help="llm.max_tokens (0: the configuration's)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sweep", action="store_true",
                        help="no conversation: score every pause once and tabulate cut-offs and endpointing "
                        "for a grid of hangovers (choosing the defaults)")
    parser.add_argument("--model-ms", type=float, default=60.0, help="--sweep: the model's decision time")
    args = parser.parse_args()
    turn = load_config(args.config).turn
    args.complete_ms = args.complete_ms or turn.complete_hangover_ms
    args.incomplete_ms = args.incomplete_ms or turn.incomplete_hangover_ms
    args.threshold = args.threshold or turn.threshold
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
