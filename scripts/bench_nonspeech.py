#!/usr/bin/env python3
"""Non-speech inputs: phantom turns without and with the guard; speech turns lost to it.

Every input is played into a call's turn-taking exactly as a call hears it
(scripts/bench_quiet.py `call_turns`: 20 ms frames through webrtcvad, the
`Endpointer`, the `UtteranceTranscriber`'s final cut) and each turn's audio is
transcribed by Whisper.  In one run, per input:

* **phantom turns without the guard** — turns whose transcript has words
  (what `responder.py` answered before issue 9: ``has_words``);
* **with the guard** — of those, the ones that `agent/speech_guard.py` lets
  through (the spectral check on the turn's voiced audio, and Whisper's
  non-speech marks such as "(music)").

Then the Asterisk speech set (scripts/bench_asr.py's loader): turns the guard
would drop, and the WER without and with it (a dropped turn counts as no
words).

Inputs (each: 0.5 s silence, the signal, 1.5 s silence; tones at -10 dBFS
peak unless said): pure tones 350–2100 Hz of 0.2–3 s; DTMF digits (ITU-T
Q.23 pairs) alone and as a dialled string; ringback (440+480 Hz, 2 s on 4 s
off), dial tone (350+440), busy (480+620, 0.5/0.5 s), SIT (913.8, 1370.6,
1776.7 Hz, 330 ms each), fax CNG (1100 Hz 0.5 s on 3 s off) and CED
(2100 Hz 3 s), call waiting (440 Hz 0.3 s twice), voicemail beep; white, pink
and brown noise at three levels; a synthetic arpeggio and a held chord (a few
harmonics per note); the field case `tone_1khz_1s.wav`.

    python scripts/bench_nonspeech.py                  # all inputs, all speech clips
    python scripts/bench_nonspeech.py --speech-limit 100
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_asr import DEFAULT_DATA_DIR, ensure_data, load_clips, machine
from bench_quiet import CachedStt, build, call_turns

from sub300.agent.config import load_config
from sub300.agent.speech_guard import is_annotation
from sub300.agent.words import has_words
from sub300.models.protocols import SAMPLE_RATE
from sub300.testing.wer import word_errors

R = SAMPLE_RATE
CASE = Path("/work/shared/cases/tone_1khz_1s.wav")
DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "0": (941, 1336),
        "*": (941, 1209), "#": (941, 1477), "A": (697, 1633), "D": (941, 1633)}


def _t(s: float) -> np.ndarray:
    return np.arange(int(round(s * R))) / R


def sil(s: float) -> np.ndarray:
    return np.zeros(int(round(s * R)))


def tone(freqs, s: float, peak: float = 10 ** (-10 / 20)) -> np.ndarray:
    return sum(np.sin(2 * np.pi * f * _t(s)) for f in freqs) * peak / len(freqs)


def cadence(freqs, on: float, off: float, times: int) -> np.ndarray:
    return np.concatenate([np.concatenate([tone(freqs, on), sil(off)]) for _ in range(times)])


def noise(colour: str, s: float, rms_db: float, seed: int = 1) -> np.ndarray:
    white = np.random.default_rng(seed).standard_normal(int(s * R))
    if colour != "white":
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(len(white), 1 / R)
        f[0] = f[1]
        spec /= np.sqrt(f) if colour == "pink" else f
        white = np.fft.irfft(spec, len(white))
    return white / np.sqrt(np.mean(white ** 2)) * 10 ** (rms_db / 20)


def arpeggio(s: float, note_s: float = 0.2, decay: float = 3.0) -> np.ndarray:
    notes, out, t = (261.6, 329.6, 392.0, 523.3), [], _t(note_s)
    for i in range(int(s / note_s)):
        f = notes[i % 4]
        out.append(sum(0.15 / h * np.sin(2 * np.pi * f * h * t) for h in range(1, 6)) * np.exp(-decay * t))
    return np.concatenate(out)


def inputs() -> list[tuple[str, np.ndarray]]:
    """(name, int16 pcm) of every non-speech input, silence around each."""
    items: list[tuple[str, np.ndarray]] = []
    for hz in (350, 440, 697, 1000, 1400, 2100):
        for s in (0.2, 0.5, 1.0, 3.0):
            items.append((f"tone {hz} Hz {s:g} s", tone([hz], s)))
    for d in ("1", "5", "9", "#", "D"):
        items.append((f"DTMF {d} 100 ms", tone(DTMF[d], 0.1)))
        items.append((f"DTMF {d} 250 ms", tone(DTMF[d], 0.25)))
    items.append(("DTMF string 5551234 (100/100 ms)",
                  np.concatenate([np.concatenate([tone(DTMF[d], 0.1), sil(0.1)]) for d in "5551234"])))
    items += [
        ("ringback 440+480, 2 on 4 off ×2", cadence((440, 480), 2.0, 4.0, 2)),
        ("UK ringback 400+450, .4/.2/.4 on 2 off", np.concatenate([tone((400, 450), .4), sil(.2), tone((400, 450), .4)])),
        ("dial tone 350+440 3 s", tone((350, 440), 3.0)),
        ("busy 480+620 .5/.5 ×4", cadence((480, 620), 0.5, 0.5, 4)),
        ("SIT 913.8/1370.6/1776.7", np.concatenate([tone([f], 0.33) for f in (913.8, 1370.6, 1776.7)])),
        ("fax CNG 1100 Hz .5 on 3 off ×2", cadence([1100], 0.5, 3.0, 2)),
        ("fax CED 2100 Hz 3 s", tone([2100], 3.0)),
        ("call waiting 440 Hz .3 s ×2", cadence([440], 0.3, 0.5, 2)),
        ("voicemail beep 1000 Hz 0.5 s", tone([1000], 0.5)),
    ]
    for colour in ("white", "pink", "brown"):
        for db in (-40, -25, -12):
            items.append((f"{colour} noise {db} dBFS rms 2 s", noise(colour, 2.0, db)))
    items += [
        ("arpeggio C-E-G-C 3 s (5 harmonics, decaying)", arpeggio(3.0)),
        ("arpeggio, fast decay", arpeggio(3.0, 0.25, 8.0)),
        ("held chord C-E-G 2 s (4 harmonics)",
         np.sum([tone([f * h for h in range(1, 5)], 2.0, 0.1) for f in (261.6, 329.6, 392.0)], axis=0)),
    ]
    out = [(name, np.concatenate([sil(0.5), x, sil(1.5)])) for name, x in items]
    pcm = [(name, np.clip(x * 32767, -32768, 32767).astype(np.int16)) for name, x in out]
    if CASE.exists():
        from sub300.media.audio_file import read_audio

        pcm.append((f"field case {CASE.name}", read_audio(CASE)))
    return pcm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speech-limit", type=int, default=None, help="only the first N Asterisk clips")
    parser.add_argument("--no-speech", action="store_true", help="skip the Asterisk speech set")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    config = load_config(environ={})
    config.vad.speech_guard = True
    vad, whisper = build(config)
    stt = CachedStt(whisper)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Non-speech inputs played into the call's endpointing (webrtcvad, aggressiveness "
          f"{config.vad.aggressiveness}) + STT cut, `{config.stt.model}` — {now}, {machine()}\n")
    print("| input | turns | phantom turns without guard | with guard | Whisper heard | guard |")
    print("|---|---:|---:|---:|---|---|")
    total = [0, 0, 0]
    for name, pcm in inputs():
        turns = call_turns(pcm, vad, copy.deepcopy(config))
        texts = [stt(t.audio).text.strip() for t in turns]
        before = [has_words(x) for x in texts]
        after = [b and not is_annotation(x) and t.guard is not None and t.guard.is_speech
                 for b, x, t in zip(before, texts, turns, strict=True)]
        reasons = "; ".join(sorted({(t.guard.reason or "speech").split(" (")[0] for t in turns if t.guard}))
        heard = " / ".join(repr(x) for x in texts)[:60]
        total[0] += len(turns)
        total[1] += sum(before)
        total[2] += sum(after)
        print(f"| {name} | {len(turns)} | {sum(before)} | {sum(after)} | {heard} | {reasons} |")
    print(f"| **all {len(inputs())} inputs** | {total[0]} | **{total[1]}** | **{total[2]}** | | |")
    if args.no_speech:
        return 0
    clips = load_clips(ensure_data(args.data_dir), args.speech_limit)
    lead, gap = np.zeros(R // 2, np.int16), np.zeros(R, np.int16)
    errs_off = errs_on = words = lost = nturns = 0
    lost_names = []
    for clip in clips:
        pcm = np.concatenate([lead, np.clip(clip.audio * 32767, -32768, 32767).astype(np.int16), gap])
        turns = call_turns(pcm, vad, copy.deepcopy(config))
        texts = [stt(t.audio).text for t in turns]
        kept = [x for x, t in zip(texts, turns, strict=True) if t.guard is None or t.guard.is_speech]
        dropped = len(turns) - len(kept)
        if dropped:
            lost_names.append(clip.name)
        lost += dropped
        nturns += len(turns)
        e_off, w = word_errors(clip.reference, " ".join(texts))
        e_on, _ = word_errors(clip.reference, " ".join(kept))
        errs_off, errs_on, words = errs_off + e_off, errs_on + e_on, words + w
    print(f"\nAsterisk speech set ({len(clips)} clips, the same path):\n")
    print("| speech turns | lost to the guard | WER without guard | WER with guard |")
    print("|---:|---:|---:|---:|")
    print(f"| {nturns} | {lost}{' (' + ', '.join(lost_names[:5]) + ')' if lost_names else ''} | "
          f"{100 * errs_off / words:.2f} % ({errs_off}/{words}) | {100 * errs_on / words:.2f} % ({errs_on}/{words}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
