"""Non-speech guard: tones, noise and music that the VAD took for a turn.

A voice-activity detector answers "is there energy that looks like a voice
in this 20-30 ms frame"; a 1 kHz beep, a DTMF digit heard in-band, ringback,
a fax CNG tone, steady noise or a few bars of music all pass it, and Whisper
then "hears" a word in them.  This module looks at the whole utterance once
it has ended and says whether it is speech.

Where the guard lives, and why.  The check is spectral, over the utterance's
audio, in the turn-taking path (the conversation runs it when the endpointer
ends a turn; the responder drops the turn before the LLM):

* Whisper's own signals (`no_speech_prob`, `avg_logprob`, exposed in
  `Transcript`) are **not** enough: on the field case's turn (1 kHz for
  1 s) tiny.en writes "F***!" with no_speech_prob 0.51 and avg_logprob
  -1.31, which passes Whisper's own no-speech rule (> 0.6 *and* < -1.0,
  already applied in models/stt_whisper.py), while clear speech scores
  ~0.08; a threshold between them would be a guess per model and level.
  The probability is kept in the ledger notes (``stt_no_speech_prob``).
* A spectral measure is model-free, a few ms per utterance, and it tests
  what separates speech from all of these at once: **speech moves**.  Its
  level rises and falls with every syllable and its pitch glides, while a
  pure or dual tone keeps its energy in one or two narrow lines that do not
  move, steady noise keeps a fixed level, and a note of music holds a fixed
  harmonic series.

Three measures over the utterance (32 ms Hann frames, 16 ms hop, 16 kHz;
the "active" frames are those within `ACTIVE_DB` of the loudest one):

* ``level_std_db`` — standard deviation of the active frames' levels (dB,
  100 Hz .. 4 kHz).  Speech rises and falls with every syllable: on the 551
  Asterisk prompts it is never below 4.4 dB (median 7.0).  A tone, steady
  noise (white, pink, brown) or a held chord: 0 .. 2.7 dB.
* ``steady_peaks`` — the share of consecutive frame pairs whose spectrum
  (300 Hz .. 4 kHz) is one or two narrow peaks holding most of the energy,
  the strongest of which stayed within 1 Hz (parabolic interpolation) from
  one frame to the next.  A generator's tone or a DTMF pair: 0.67 .. 1;
  the notes of synthetic music: ~0.8; speech, whose harmonics glide: at
  most 0.31, and at most 0.23 where its line share (next) is >= 0.6.
* ``line_share`` — the share of the energy (300 Hz .. 4 kHz) in narrow
  spectral lines of the long-term spectrum (0.5 s chunks, ~2 Hz
  resolution): bins more than 10 dB above the geometric mean of their
  ±40 Hz neighbourhood.  Tones, ringback, exact harmonics: > 0.9 (two close tones
  that beat, as ringback 440+480 Hz, which the 32 ms frames cannot resolve:
  1.0); speech: median 0.13, at most 0.91 on the Asterisk set.

An utterance is rejected when it is **static** (``level_std_db <
MIN_LEVEL_STD_DB`` over at least 256 ms: tones, noise, held chords), when
its **peaks are steady** (``steady_peaks >= MAX_STEADY_PEAKS`` and
``line_share >= STEADY_LINE_SHARE``: DTMF, beeps, cadences, notes), or when
it is **all lines** (``line_share >= MAX_LINE_SHARE`` and ``level_std_db <
TONAL_LEVEL_STD_DB``: beating dual tones in a cadence).  The thresholds
keep a margin on the speech side — a lost real turn is worse than a phantom
one; scripts/bench_nonspeech.py measures both sides.

Whisper's non-speech annotations ("(music)", "[BLANK_AUDIO]", "*beep*",
"♪") are the last line: a transcript made only of them is no turn
(`is_annotation`).

Sources: energy-contour variance and spectral-line (tonality) measures are
the classical speech/non-speech features (Scheirer & Slaney, "Construction
and evaluation of a robust multifeature speech/music discriminator", ICASSP
1997); peak interpolation: Smith & Serra, "PARSHL", ICMC 1987; the
thresholds are this project's, measured as stated above
(scripts/bench_nonspeech.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sub300.models.protocols import SAMPLE_RATE

FRAME = 512                 # 32 ms analysis frame at 16 kHz
HOP = 256                   # 16 ms hop
ACTIVE_DB = 30.0            # frames within this many dB of the loudest frame are analysed
MIN_FRAMES = 3              # fewer active frames (< 64 ms) than this: too short to judge, let it through
MIN_STATIC_FRAMES = 16      # the level-spread rule needs this many (256 ms): a syllable can be steady
LEVEL_BAND_HZ = (100.0, 4000.0)
LINE_BAND_HZ = (300.0, 4000.0)
CHUNK_S = 0.5               # long-term spectrum chunk (resolution ~2 Hz)
MIN_CHUNK = 1600            # a last chunk shorter than 100 ms is left out (unless it is the only one)
LINE_FFT = 4096             # at least this many points (zero-padded) per chunk
LINE_DB = 10.0              # a line stands this far above its neighbourhood's median
LINE_NEIGHBOURHOOD_HZ = 40.0  # at least; 3 Hann half-lobes for a short chunk
LINE_HALF_WIDTH = 2         # bins either side of a line bin that count as the line (at least; half a lobe)

PEAK_FFT = 1024             # zero-padded frame FFT for the peak frequencies (15.6 Hz bins, then interpolated)
PEAK_HALF_HZ = 30.0         # a peak's energy: within this many Hz of it (the 32 ms Hann main lobe)
PEAK_SHARE = 0.6            # a frame is "one or two peaks" when they hold this share of its energy
STEADY_HZ = 1.0             # a peak that moved less than this in 16 ms did not move

#: this share of frame pairs with the same one or two peaks ... (speech with line_share >= 0.6: <= 0.23 measured)
MAX_STEADY_PEAKS = 0.5
#: ... and this line share is tones or music (DTMF, beeps, notes: steady >= 0.67, line share >= 0.88)
STEADY_LINE_SHARE = 0.6
#: below this energy-contour spread (dB) an utterance is static: not speech (speech: >= 4.4 dB measured)
MIN_LEVEL_STD_DB = 3.0
#: this share of energy in narrow lines ... (speech: <= 0.91 measured; two close tones that beat: 1.0)
MAX_LINE_SHARE = 0.95
#: ... with a contour spread below this (dB) is a tone cadence
TONAL_LEVEL_STD_DB = 6.0

_ANNOTATION = re.compile(r"^\s*(?:[\(\[\*][^\)\]\*]*[\)\]\*]|[♪♫#\s.,!?-])*\s*$")


@dataclass(frozen=True)
class SpeechCheck:
    """The guard's measures for one utterance and its verdict.

    ``level_std_db``: dB; ``line_share``, ``steady_peaks``: 0..1; ``frames``: active 16 ms
    frames analysed; ``reason``: why it is not speech, or None when it is
    (or is too short to judge).
    """

    level_std_db: float
    line_share: float
    frames: int
    reason: str | None
    steady_peaks: float = 0.0

    @property
    def is_speech(self) -> bool:
        return self.reason is None

    def notes(self) -> dict[str, float | int | str | None]:
        """For the turn ledger's notes."""
        return {"guard_level_std_db": round(self.level_std_db, 2), "guard_line_share": round(self.line_share, 3),
                "guard_steady_peaks": round(self.steady_peaks, 3), "guard_frames": self.frames}


def is_annotation(text: str) -> bool:
    """The transcript is only Whisper's non-speech marks ("(music)", "[BLANK_AUDIO]", "*beep*", "♪"), not empty."""
    return bool(re.search(r"[\(\[\*♪♫]", text)) and bool(_ANNOTATION.match(text))


def _local_log_mean(values: np.ndarray, half: int) -> np.ndarray:
    """The geometric mean of ``values`` over ±``half`` bins around each (a running mean of the log):
    a narrow line barely lifts it, unlike an arithmetic mean; O(n), unlike a running median."""
    logs = np.log(np.pad(values, half, mode="edge") + 1e-30)
    sums = np.concatenate([[0.0], np.cumsum(logs)])
    width = 2 * half + 1
    return np.exp((sums[width:] - sums[:-width]) / width)


def _line_share(chunk: np.ndarray) -> tuple[float, float]:
    """(share of energy in narrow lines, energy) of one chunk's spectrum in LINE_BAND_HZ."""
    n = max(len(chunk), LINE_FFT)
    power = np.abs(np.fft.rfft(chunk * np.hanning(len(chunk)), n=n)) ** 2
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    band = power[(freqs >= LINE_BAND_HZ[0]) & (freqs <= LINE_BAND_HZ[1])]
    total = float(band.sum())
    if total <= 0.0:
        return 0.0, 0.0
    bin_hz = SAMPLE_RATE / n
    lobe_hz = 2.0 * SAMPLE_RATE / len(chunk)      # half the Hann main lobe: a short chunk's lines are wide
    half = max(3, int(max(LINE_NEIGHBOURHOOD_HZ, 3.0 * lobe_hz) / bin_hz))
    lines = band > 10 ** (LINE_DB / 10) * _local_log_mean(band, half)
    held = lines.copy()
    for s in range(1, max(LINE_HALF_WIDTH, int(np.ceil(lobe_hz / bin_hz))) + 1):
        held[s:] |= lines[:-s]
        held[:-s] |= lines[s:]
    return float(band[held].sum()) / total, total


def _interpolated_peak(power: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (index, frequency in Hz) of the strongest bin, refined by a parabola through the
    log power of it and its neighbours (Smith & Serra, "PARSHL", ICMC 1987)."""
    rows = np.arange(len(power))
    i = np.clip(np.argmax(power, axis=1), 1, power.shape[1] - 2)
    a, b, c = (np.log(power[rows, i + k] + 1e-30) for k in (-1, 0, 1))
    denom = a - 2 * b + c
    offset = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    return i, freqs[i] + np.clip(offset, -0.5, 0.5) * (freqs[1] - freqs[0])


def _steady_peaks(frames: np.ndarray, active: np.ndarray) -> float:
    """Share of consecutive active frame pairs in which the spectrum is one or two narrow peaks
    (>= PEAK_SHARE of the 300 Hz .. 4 kHz energy within ±PEAK_HALF_HZ of them) and the strongest
    peak of the second frame is within STEADY_HZ of one of the first's two.  A tone generator's
    frequency does not move; a voice's harmonics glide."""
    power = np.abs(np.fft.rfft(frames, n=PEAK_FFT, axis=1)) ** 2
    freqs = np.fft.rfftfreq(PEAK_FFT, 1.0 / SAMPLE_RATE)
    keep = (freqs >= LINE_BAND_HZ[0]) & (freqs <= LINE_BAND_HZ[1])
    power, freqs = power[:, keep], freqs[keep]
    total = power.sum(axis=1) + 1e-30
    half = int(np.ceil(PEAK_HALF_HZ / (freqs[1] - freqs[0])))
    rows, cols = np.arange(len(power)), np.arange(power.shape[1])
    sums = np.concatenate([np.zeros((len(power), 1)), np.cumsum(power, axis=1)], axis=1)

    def around(i: np.ndarray) -> np.ndarray:   # energy within ±half bins of bin i, per row
        return sums[rows, np.minimum(i + half + 1, power.shape[1])] - sums[rows, np.maximum(i - half, 0)]

    i1, f1 = _interpolated_peak(power, freqs)
    masked = np.where(np.abs(cols[None, :] - i1[:, None]) <= half, 0.0, power)
    i2, f2 = _interpolated_peak(masked, freqs)
    overlap = np.abs(i2 - i1) <= 2 * half     # the second peak's window overlaps the first's: count once
    held = around(i1) + np.where(overlap, 0.0, around(i2))
    peaked = held / total >= PEAK_SHARE
    same = np.minimum(np.abs(f1[1:] - f1[:-1]), np.abs(f1[1:] - f2[:-1])) < STEADY_HZ
    steady = same & peaked[1:] & peaked[:-1]
    pairs = active[1:] & active[:-1]
    return float(steady[pairs].mean()) if pairs.any() else 0.0


def check(audio: np.ndarray) -> SpeechCheck:
    """Judge one utterance.

    `audio`: mono 16 kHz, int16 or float in [-1, 1] (the utterance; silence
    around it is ignored).  Returns a `SpeechCheck`; never raises on short or
    silent input (too short to judge counts as speech: the guard only rejects
    what it is sure of).  Cost: a few ms per second of audio.
    """
    x = np.asarray(audio).reshape(-1)
    x = x.astype(np.float64) / 32768.0 if x.dtype == np.int16 else x.astype(np.float64)
    if len(x) < FRAME:
        return SpeechCheck(float("inf"), 0.0, 0, None)
    n = 1 + (len(x) - FRAME) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP][:n] * np.hanning(FRAME)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(FRAME, 1.0 / SAMPLE_RATE)
    energy = power[:, (freqs >= LEVEL_BAND_HZ[0]) & (freqs <= LEVEL_BAND_HZ[1])].sum(axis=1)
    if energy.max() <= 1e-12:
        return SpeechCheck(float("inf"), 0.0, 0, None)
    level = 10 * np.log10(energy + 1e-12)
    active = level >= level.max() - ACTIVE_DB
    count = int(active.sum())
    if count < MIN_FRAMES:
        return SpeechCheck(float("inf"), 0.0, count, None)
    level_std = float(np.std(level[active]))
    first, last = int(np.argmax(active)), len(active) - int(np.argmax(active[::-1]))
    segment = x[first * HOP: (last - 1) * HOP + FRAME]
    step = int(CHUNK_S * SAMPLE_RATE)
    shares, weights = [], []
    for start in range(0, len(segment), step):
        chunk = segment[start: start + step]
        if len(chunk) < MIN_CHUNK and start > 0:
            continue
        share, weight = _line_share(chunk)
        shares.append(share)
        weights.append(weight)
    line_share = float(np.average(shares, weights=weights)) if sum(weights) > 0 else 0.0
    steady = _steady_peaks(frames, active)
    reason = None
    if level_std < MIN_LEVEL_STD_DB and count >= MIN_STATIC_FRAMES:
        reason = f"steady sound, not speech (level spread {level_std:.1f} dB)"
    elif steady >= MAX_STEADY_PEAKS and line_share >= STEADY_LINE_SHARE:
        reason = f"tones or music, not speech (steady peaks {steady:.2f})"
    elif line_share >= MAX_LINE_SHARE and level_std < TONAL_LEVEL_STD_DB:
        reason = f"tones or music, not speech (line share {line_share:.2f})"
    return SpeechCheck(level_std, line_share, count, reason, steady)
