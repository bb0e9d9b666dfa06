#!/usr/bin/env python3
"""Quiet callers: WER on the Asterisk set at several levels, old vs new endpointing.

Each clip (scaled by the level) is played into a call's turn-taking exactly as
a call hears it — 0.5 s of silence, the clip, 1 s of silence, in 20 ms frames
through the configured VAD, the `Endpointer` and the `UtteranceTranscriber`
(early final, its relaunch when the end moves, the final's cut) — and the
audio of each turn's *final* transcription is handed to Whisper.  So the
end-of-speech refinement and the STT cut are measured, not just the model.

Modes, in one run (clip by clip, interleaved, so load falls on both alike):

* ``old``: ``vad.relative_end = false``, ``stt.tail_ms = 0`` — the fixed
  -55 dBFS end floor and the cut at the first unvoiced frame (before issue 9);
* ``new``: the defaults (end floor relative to the call's noise floor and the
  utterance's level; `stt.tail_ms` of audio after the refined end).

With ``--early-start`` the two modes are instead the defaults with the early
final waiting for the tail (``old``: `transcription.START_BEFORE_TAIL` off, as
before issue 11) and the defaults (``new``: it starts at the silence onset on
the audio there is, relaunched when the tail holds sound).

The honest-end check (`speech_end` not later than the end of the voice) is
tests/test_quiet_caller.py, on synthetic speech with a known end.

    python scripts/bench_quiet.py                       # x1, x0.1, x0.05, x0.02, all clips
    python scripts/bench_quiet.py --levels 1,0.05 --limit 100
    python scripts/bench_quiet.py --levels 1,0.05 --limit 120 --early-start

Data and WER as in scripts/bench_asr.py (its loader is reused).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_asr import DEFAULT_DATA_DIR, ensure_data, load_clips, machine

from sub300.agent.audio_ring import AudioRing
from sub300.agent.config import Config, load_config
from sub300.agent.endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from sub300.agent.speech_guard import (
    SpeechCheck,
    is_annotation,
)
from sub300.agent.speech_guard import check as guard_check
from sub300.agent.tasks import TaskOwner
from sub300.agent.transcription import UtteranceTranscriber
from sub300.models.protocols import SAMPLE_RATE, SpeechRecognizer, Transcript, VoiceActivityDetector
from sub300.testing.wer import word_errors

FRAME = 320   # the transports' 20 ms frames


# ------------------------------------------------------------------ one call, emulated
class _Recorder:
    """A stand-in recogniser that keeps the audio of every transcription (its text is the index)."""

    name, device = "recorder", "cpu"

    def __init__(self) -> None:
        self.audio: list[np.ndarray] = []

    async def transcribe_async(self, audio: np.ndarray, *, ticket: object = None) -> Transcript:
        self.audio.append(audio.copy())
        await asyncio.sleep(0)
        return Transcript(str(len(self.audio) - 1), len(audio) / SAMPLE_RATE, 0.0)


@dataclass
class CallTurn:
    """One turn of an emulated call: the audio its final transcription got, the endpointer's end."""

    audio: np.ndarray          # float32, what the final transcription covered
    start_sample: int          # first voiced sample (from the call's start)
    end_sample: int            # the refined end of speech
    speech_end: float          # the ledger's speech_end (s from the call's start)
    guard: SpeechCheck | None = None   # the guard's verdict on the voiced part


async def _call_turns(pcm: np.ndarray, vad: VoiceActivityDetector, config: Config) -> list[CallTurn]:
    v, stt = config.vad, config.stt
    endpointer = Endpointer(vad, min_speech_ms=v.min_speech_ms, hangover_ms=v.hangover_ms,
                            relative=v.relative_end)
    ring = AudioRing(len(pcm) + SAMPLE_RATE)
    recorder = _Recorder()
    owner = TaskOwner("bench")
    pre_roll = v.pre_roll_ms * SAMPLE_RATE // 1000
    turns: list[CallTurn] = []
    speaking: tuple[UtteranceTranscriber, int] | None = None
    pending = []
    clock = [0.0]                   # the call's time: the arrival of the latest frame
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        frame = pcm[i: i + FRAME]
        ring.append(frame)
        now = clock[0] = (i + FRAME) / SAMPLE_RATE
        for event in endpointer.feed(frame, now):
            if isinstance(event, SpeechStarted):
                transcriber = UtteranceTranscriber(
                    stt=recorder, ring=ring, endpointer=endpointer, start_sample=max(0, event.sample - pre_roll),
                    owner=owner.child("turn"), clock=lambda: clock[0], early_final=stt.early_final,
                    partial_interval_s=0.0, on_early_final=lambda _t, _x: None, on_partial=lambda _x: None,
                    on_stale=lambda: None, tail_samples=stt.tail_ms * SAMPLE_RATE // 1000)
                speaking = (transcriber, event.sample)
            elif isinstance(event, SpeechPaused) and speaking:
                speaking[0].speech_paused()
            elif isinstance(event, SpeechResumed) and speaking:
                speaking[0].speech_resumed()
            elif isinstance(event, SpeechEnded) and speaking:
                final, _early = speaking[0].final(event.end_sample)
                pending.append((final, event, speaking[1]))
                speaking = None
        if speaking:
            speaking[0].tick()
        await asyncio.sleep(0)      # let the recorder's tasks run, as the event loop would between frames
    for final, event, voiced_start in pending:
        index = int((await final.task).text)
        voiced = ring.slice(voiced_start, event.end_sample)
        turns.append(CallTurn(recorder.audio[index], voiced_start, event.end_sample, event.speech_end,
                              guard_check(voiced)))
    await owner.aclose()
    return turns


def call_turns(pcm: np.ndarray, vad: VoiceActivityDetector, config: Config,
               start_before_tail: bool = True) -> list[CallTurn]:
    """The turns a call would make of ``pcm`` (int16 16 kHz, from the call's start), with each final's audio.
    ``start_before_tail`` False: the early final waits for the tail (before issue 11)."""
    from sub300.agent import transcription

    saved, transcription.START_BEFORE_TAIL = transcription.START_BEFORE_TAIL, start_before_tail
    try:
        return asyncio.run(_call_turns(pcm, vad, config))
    finally:
        transcription.START_BEFORE_TAIL = saved


def configs(base: Config) -> dict[str, Config]:
    old = copy.deepcopy(base)
    old.vad.relative_end, old.stt.tail_ms = False, 0
    return {"old": old, "new": copy.deepcopy(base)}


class CachedStt:
    """Whisper, memoised by the audio's bytes (old and new cuts are often the same)."""

    def __init__(self, stt: SpeechRecognizer) -> None:
        self.stt, self.seconds = stt, 0.0
        self.cache: dict[str, Transcript] = {}

    def __call__(self, audio: np.ndarray) -> Transcript:
        key = hashlib.sha1(np.ascontiguousarray(audio, np.float32).tobytes()).hexdigest()
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.stt.transcribe(audio)
            self.seconds += time.perf_counter() - t0
        return self.cache[key]


def build(config: Config):
    from sub300.agent.engines import _webrtc_vad, _whisper  # the factories a call uses

    return _webrtc_vad(config), _whisper(config)


# ------------------------------------------------------------------ the benchmark
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,0.1,0.05,0.02", help="gains applied to every clip")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--early-start", action="store_true",
                        help="old = the defaults with the early final waiting for the tail, new = the defaults")
    args = parser.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",")]
    base = load_config(environ={})
    vad, whisper = build(base)
    stt = CachedStt(whisper)
    clips = load_clips(ensure_data(args.data_dir), args.limit)
    modes = configs(base)
    if args.early_start:
        modes = {"old": copy.deepcopy(base), "new": copy.deepcopy(base)}
    errors = {(lv, m): [0, 0, 0, 0.0] for lv in levels for m in modes}   # errors, words, no-turn clips, late end
    lead, gap = np.zeros(int(0.5 * SAMPLE_RATE), np.int16), np.zeros(SAMPLE_RATE, np.int16)
    for n, clip in enumerate(clips):
        for level in levels:
            pcm = np.concatenate([lead, np.clip(clip.audio * level * 32767, -32768, 32767).astype(np.int16), gap])
            for mode, config in modes.items():
                turns = call_turns(pcm, vad, config, start_before_tail=not (args.early_start and mode == "old"))
                hyp = " ".join(stt(t.audio).text for t in turns)
                e, w = word_errors(clip.reference, hyp)
                row = errors[(level, mode)]
                row[0] += e
                row[1] += w
                row[2] += not turns
        if (n + 1) % 50 == 0:
            print(f"{n + 1}/{len(clips)} clips", file=sys.stderr)
    peak_db = float(np.median([20 * np.log10(max(float(np.abs(c.audio).max()), 1e-9)) for c in clips]))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Quiet callers: Asterisk core sounds ({len(clips)} clips) played into the call's endpointing + STT cut, "
          f"webrtcvad (aggressiveness {base.vad.aggressiveness}), `{base.stt.model}` — {now}, {machine()}\n")
    old_name, new_name = (("early final after the tail", "early final at the silence onset") if args.early_start
                          else ("fixed -55 dBFS floor, no tail", f"relative floor, tail {base.stt.tail_ms} ms"))
    print(f"| level | median clip peak | WER old ({old_name}) | WER new ({new_name}) | clips with no turn old / new |")
    print("|---:|---:|---:|---:|---:|")
    for level in levels:
        o, nw = errors[(level, "old")], errors[(level, "new")]
        print(f"| ×{level:g} | {peak_db + 20 * np.log10(level):.0f} dBFS | {100 * o[0] / o[1]:.2f} % ({o[0]}/{o[1]}) | "
              f"{100 * nw[0] / nw[1]:.2f} % ({nw[0]}/{nw[1]}) | {o[2]} / {nw[2]} |")
    print(f"\nWhisper time {stt.seconds:.0f} s for {len(stt.cache)} distinct cuts", file=sys.stderr)
    return 0


def is_phantom(text: str) -> bool:
    """Whisper gave words that would be answered (not only its non-speech marks)."""
    from sub300.agent.words import has_words

    return has_words(text) and not is_annotation(text)


if __name__ == "__main__":
    sys.exit(main())
