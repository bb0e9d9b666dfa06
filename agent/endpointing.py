"""Endpointing: from per-frame voice activity to turn boundaries.

Feeds 16 kHz caller audio through a VoiceActivityDetector (re-chunked to the
detector's frame size) and reports, with sample-exact timestamps:

* VoiceOnset    — `onset_ms` of voiced audio in a row (optional, shorter than
  `min_speech_ms`): enough to pause a speaking agent at once, not yet a turn;
* SpeechStarted — `min_speech_ms` of voiced audio in a row;
* SpeechPaused  — the first unvoiced frame after voiced ones (a chance to
  start transcribing early);
* SpeechResumed — voice again before the hangover expired;
* SpeechEnded   — `hangover_ms` of silence: the turn is over.  It carries the
  *true* end of speech, where the latency clock starts, not the moment the
  hangover expired.

The hangover may change inside a pause (issue 11, agent/end_of_turn.py): at
each SpeechPaused it starts at `hangover_ms`, and `decide_hangover` sets the
one for that pause once a turn-completion decision arrives — shorter when the
turn sounds complete, longer when it does not.  Every hangover counts from
the true end of speech; a decision that arrives after its hangover has
already elapsed ends the turn at once (scoring takes some milliseconds).

The true end is refined below the detector's frame: webrtcvad keeps calling
frames voiced for ~100 ms after the voice stops (its own internal hangover),
which would start the latency clock late and flatter every figure.  So the
end is moved back to the last 10 ms block that is still voice, and the
hangover is counted from there.  The reverse also happens (a soft final
consonant the detector calls unvoiced), so voice blocks shortly after the
detector's end extend it.

"Still voice" is relative to the caller's own line (issue 9, quiet callers):
a block is voice when it is within `END_DROP_DB` of the utterance's loudest
block *and* `NOISE_MARGIN_DB` above the call's noise floor, tracked per call
as a low percentile (`NOISE_PERCENTILE`) of the 10 ms block levels heard
outside speech over the last `NOISE_WINDOW_S`.  No fixed absolute floor: a
caller at -29 dBFS peak (x0.05) keeps the soft end of "France" that the old
-55 dBFS floor (`END_FLOOR_DBFS`, still used with ``relative=False``) cut off.
The end stays honest: a block at the noise floor is never voice, and within
the last voice block the end is the sample after the last one that reaches
the floor's level (`_sample_end`), so `speech_end` is not later than the end
of the voice (tests/test_quiet_caller.py, on synthetic and spoken audio with
a known end).

In the same mode the detector hears a quiet caller lifted to their own level
(`_vad_gain`): webrtcvad has a fixed energy gate and would never open a turn
for a caller at x0.01 (peak about -45 dBFS); the copy it classifies is
scaled so that the loudest block of the last few seconds reaches
`VAD_TARGET_DBFS` (at most `VAD_MAX_GAIN_DB`, and never lifting the call's
noise floor above `VAD_NOISE_CEIL_DBFS`).  Only the detector's copy: levels,
the refinement and the audio for STT are the caller's own.

With ``relative=False`` (config ``vad.relative_end = false``) everything is
as before issue 9: fixed floor, block-resolution end, no lift
(scripts/bench_quiet.py measures both in one run).

Sample indices count from the start of the call, so callers can cut the
utterance out of their audio history.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from sub300.models.protocols import SAMPLE_RATE, VoiceActivityDetector

from .audio import rms_dbfs


@dataclass(frozen=True)
class VoiceOnset:
    sample: int       # first voiced sample of the run
    time: float       # when that sample arrived


@dataclass(frozen=True)
class SpeechStarted:
    sample: int       # first voiced sample
    time: float


@dataclass(frozen=True)
class SpeechPaused:
    sample: int       # end of the last voiced frame
    time: float


@dataclass(frozen=True)
class SpeechResumed:
    sample: int
    time: float


@dataclass(frozen=True)
class SpeechEnded:
    start_sample: int
    end_sample: int   # end of the last voiced frame
    speech_end: float  # when that sample arrived: the true end of speech
    endpoint: float    # when the hangover expired


EndpointEvent = VoiceOnset | SpeechStarted | SpeechPaused | SpeechResumed | SpeechEnded

BLOCK = 160               # 10 ms energy blocks for refining the end of speech
END_DROP_DB = 40.0        # a block this far below the utterance's peak is silence
END_FLOOR_DBFS = -55.0    # ... and so is anything below this absolute level
END_SEARCH_S = 0.35       # how far back from the detector's last voiced frame to look
NOISE_MARGIN_DB = 8.0     # relative mode: a voice block stands this far above the call's noise floor
NOISE_PERCENTILE = 20.0   # the noise floor: this percentile of the block levels heard outside speech
NOISE_WINDOW_S = 3.0      # ... over the last this many seconds of them
VAD_TARGET_DBFS = -20.0   # relative mode: the detector hears the recent peak lifted to about this level
VAD_MAX_GAIN_DB = 30.0    # ... by at most this much
VAD_NOISE_CEIL_DBFS = -65.0   # ... and never lifting the noise floor above this
LEVEL_WINDOW_S = 3.0      # the recent peak: the loudest 10 ms block of this many seconds
SILENCE_DBFS = -120.0     # the level of digital silence (a finite floor keeps max() and comparisons simple)


def _block_levels(frame: np.ndarray) -> list[float]:
    """dBFS of consecutive 10 ms blocks of a frame (the last block takes the remainder)."""
    n = max(1, len(frame) // BLOCK)
    return [rms_dbfs(frame[k * BLOCK: len(frame) if k == n - 1 else (k + 1) * BLOCK], floor=SILENCE_DBFS)
            for k in range(n)]


class Endpointer:
    def __init__(self, vad: VoiceActivityDetector, *, min_speech_ms: int, hangover_ms: int,
                 onset_ms: int | None = None, relative: bool = True):
        """`relative`: the end-of-speech floor follows the caller's noise floor and level
        (False: the old fixed `END_FLOOR_DBFS`)."""
        self._relative = relative
        self._noise: deque[float] = deque(maxlen=int(NOISE_WINDOW_S * SAMPLE_RATE / BLOCK))
        self._recent: deque[float] = deque(maxlen=int(LEVEL_WINDOW_S * SAMPLE_RATE / BLOCK))
        self._vad = vad.new_stream()
        self._threshold = vad.threshold
        self._frame = vad.frame_samples
        self._min_speech = max(1, round(min_speech_ms * SAMPLE_RATE / 1000))
        self._hangover = round(hangover_ms * SAMPLE_RATE / 1000)
        self._pause_hangover = self._hangover      # the hangover of the current pause (`decide_hangover`)
        #: SpeechPaused events so far: identifies the pause a decision is for
        self.pauses = 0
        self._onset = None if onset_ms is None else max(1, round(onset_ms * SAMPLE_RATE / 1000))
        self._onset_sent = False
        #: arrival time of the last frame the detector called voiced (any run, turn or not)
        self.last_voiced_time = float("-inf")
        self._pending = np.zeros(0, np.int16)
        self._pending_start = 0        # absolute index of _pending[0]
        self.samples_seen = 0          # absolute index after the last sample fed
        self.in_speech = False
        self._run_start: int | None = None   # start of the current voiced run (before speech starts)
        self._start_sample = 0
        self._last_voiced_end = 0
        self._last_voiced_time = 0.0
        self._paused = False
        self._peak_db = SILENCE_DBFS
        self._vad_voiced_end = 0
        self._suppressed: deque[tuple[int, int]] = deque()   # sample ranges of suppressed audio
        # (end sample, arrival time of that sample, level) of recent 10 ms blocks
        self._levels: deque[tuple[int, float, float]] = deque(maxlen=int(END_SEARCH_S * 100) + 8)
        # the raw frames behind self._levels: the end of speech to the sample
        self._raw: deque[tuple[int, np.ndarray]] = deque(maxlen=(int(END_SEARCH_S * 100) + 8) * BLOCK // self._frame + 2)

    @property
    def paused(self) -> bool:
        """In a turn, and silent since the last voiced frame."""
        return self.in_speech and self._paused

    @property
    def voiced_end_sample(self) -> int:
        """End of the last voiced audio of the current (or last) utterance."""
        return self._last_voiced_end

    @property
    def hangover_ms(self) -> float:
        """The hangover of the current (or last) pause, ms."""
        return self._pause_hangover * 1000 / SAMPLE_RATE

    def decide_hangover(self, hangover_ms: float, pause: int, time: float) -> list[EndpointEvent]:
        """Set the hangover of pause number ``pause`` (`pauses` when it began) to ``hangover_ms``,
        counted from the true end of speech.  ``time``: now, on the clock of the frames' timestamps.

        Returns ``[SpeechEnded]`` (its ``endpoint`` = ``time``) when that hangover has already
        elapsed in the audio fed so far, else nothing; a decision for a pause that is over
        (the caller spoke again, or the turn ended) is ignored.
        """
        if pause != self.pauses or not self.paused:
            return []
        self._pause_hangover = max(1, round(hangover_ms * SAMPLE_RATE / 1000))
        events: list[EndpointEvent] = []
        if self._pending_start - self._last_voiced_end >= self._pause_hangover:
            self._end_turn(time, events)
        return events

    def _end_turn(self, time: float, events: list[EndpointEvent]) -> None:
        self.in_speech = False
        self._run_start = None
        self._paused = False
        events.append(SpeechEnded(self._start_sample, self._last_voiced_end, self._last_voiced_time, time))

    def feed(self, samples: np.ndarray, timestamp: float, *, suppressed: bool = False) -> list[EndpointEvent]:
        """`samples`: int16 16 kHz; `timestamp`: arrival time of its last sample.

        `suppressed`: this audio is known not to be the caller (the agent's echo):
        it counts as silence and is not shown to the detector, whose own hangover
        would otherwise carry a voiced run across it.
        """
        events: list[EndpointEvent] = []
        end_index = self.samples_seen + len(samples)
        if suppressed:
            samples = np.zeros_like(samples)
            self._suppressed.append((self.samples_seen, end_index))
        self.samples_seen = end_index
        self._pending = np.concatenate([self._pending, samples.astype(np.int16, copy=False)])
        while len(self._pending) >= self._frame:
            frame = self._pending[: self._frame]
            self._pending = self._pending[self._frame:]
            frame_start = self._pending_start
            frame_end = frame_start + self._frame
            self._pending_start = frame_end
            # Arrival time of this frame's last sample, from the chunk's timestamp.
            frame_time = timestamp - (end_index - frame_end) / SAMPLE_RATE
            while self._suppressed and self._suppressed[0][1] <= frame_start:
                self._suppressed.popleft()
            levels = _block_levels(frame)
            self._recent.extend(levels)
            self._raw.append((frame_start, frame))
            if any(a < frame_end and b > frame_start for a, b in self._suppressed):
                voiced = False
            else:
                gain = self._vad_gain()
                heard = frame if gain == 1.0 else np.clip(frame * gain, -32768, 32767).astype(np.int16)
                voiced = self._vad.speech_probability(heard) >= self._threshold
            for k, level in enumerate(levels):
                block_end = frame_start + (k + 1) * BLOCK if k < len(levels) - 1 else frame_end
                self._levels.append((block_end, frame_time - (frame_end - block_end) / SAMPLE_RATE, level))
            if not self.in_speech:
                self._noise.extend(levels)   # the line between turns: the caller's noise floor
            self._step(voiced, frame_start, frame_end, frame_time, max(levels), events)
        return events

    @property
    def noise_floor_db(self) -> float:
        """The call's noise floor (dBFS of a 10 ms block): a low percentile of the levels heard
        outside speech; SILENCE_DBFS before any were heard."""
        return float(np.percentile(self._noise, NOISE_PERCENTILE)) if self._noise else SILENCE_DBFS

    def _vad_gain(self) -> float:
        """The gain (linear, >= 1) at which the detector hears the caller (relative mode).

        A quiet caller (x0.02, peak ~-37 dBFS) is below webrtcvad's own energy gate and would
        never open a turn; so the detector hears the line lifted until the loudest 10 ms block
        of the last `LEVEL_WINDOW_S` reaches `VAD_TARGET_DBFS`, by at most `VAD_MAX_GAIN_DB`, and
        never so much that the call's noise floor rises above `VAD_NOISE_CEIL_DBFS`.  Only the
        detector's copy is scaled: levels, the end refinement and the audio for STT are not.
        """
        if not self._relative or not self._recent:
            return 1.0
        lift = min(VAD_TARGET_DBFS - max(self._recent), VAD_MAX_GAIN_DB, VAD_NOISE_CEIL_DBFS - self.noise_floor_db)
        return 10 ** (lift / 20) if lift > 0 else 1.0

    def _end_floor(self) -> float:
        """The level (dBFS) a 10 ms block must reach to count as voice at the end of speech."""
        if not self._relative:
            return max(END_FLOOR_DBFS, self._peak_db - END_DROP_DB)
        return max(self.noise_floor_db + NOISE_MARGIN_DB, self._peak_db - END_DROP_DB)

    def _step(self, voiced: bool, start: int, end: int, time: float, frame_peak: float,
              events: list[EndpointEvent]) -> None:
        if voiced:
            self.last_voiced_time = time
        if not self.in_speech:
            if not voiced:
                self._run_start = None
                self._onset_sent = False
                return
            if self._run_start is None:
                self._run_start = start
            run_start_time = time - (end - self._run_start) / SAMPLE_RATE
            if self._onset is not None and not self._onset_sent and end - self._run_start >= self._onset:
                self._onset_sent = True
                events.append(VoiceOnset(self._run_start, run_start_time))
            if end - self._run_start >= self._min_speech:
                self.in_speech = True
                self._start_sample = self._run_start
                self._last_voiced_end, self._last_voiced_time = end, time
                self._paused = False
                self._peak_db = max((lv for e, _, lv in self._levels if e > self._run_start), default=SILENCE_DBFS)
                self._onset_sent = False
                events.append(SpeechStarted(self._run_start, run_start_time))
            return
        if voiced:
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(start, time))
            self._last_voiced_end, self._last_voiced_time = end, time
            self._peak_db = max(self._peak_db, frame_peak)
            return
        if not self._paused:
            self._paused = True
            self.pauses += 1
            self._pause_hangover = self._hangover
            self._vad_voiced_end = self._last_voiced_end
            self._last_voiced_end, self._last_voiced_time = self._refined_end()
            self._extend_end(start)   # this first unvoiced frame's own blocks may still be voice
            events.append(SpeechPaused(self._last_voiced_end, self._last_voiced_time))
        else:
            self._extend_end(start)
        if end - self._last_voiced_end >= self._pause_hangover:
            self._end_turn(time, events)

    def _sample_end(self, block_end: int, block_time: float, floor_db: float) -> tuple[int, float]:
        """(sample, time) just after the last sample of the 10 ms block ending at ``block_end`` whose
        magnitude reaches the floor's level: the end of the voice to the sample, never after it (the
        block's own end would be up to 10 ms late).  The block's end when its audio is gone."""
        if not self._relative:
            return block_end, block_time
        amplitude = 10 ** (floor_db / 20) * 32768
        for frame_start, frame in reversed(self._raw):
            if frame_start < block_end <= frame_start + len(frame):
                lo = max(0, block_end - BLOCK - frame_start)
                loud = np.flatnonzero(np.abs(frame[lo: block_end - frame_start].astype(np.int32)) >= amplitude)
                if len(loud) == 0:
                    break
                end = frame_start + lo + int(loud[-1]) + 1
                return end, block_time - (block_end - end) / SAMPLE_RATE
        return block_end, block_time

    def _extend_end(self, frame_start: int) -> None:
        """A loud block shortly after the detector's last voiced frame is still speech.

        At its most aggressive setting webrtcvad calls a final fricative ("cat-s")
        unvoiced; without this the turn would end, and be transcribed, without it.
        Bounded to END_SEARCH_S so a noisy line cannot hold the turn open.
        """
        floor = self._end_floor()
        limit = self._vad_voiced_end + int(END_SEARCH_S * SAMPLE_RATE)
        for block_end, block_time, level in self._levels:
            if frame_start < block_end <= limit and block_end > self._last_voiced_end and level >= floor:
                self._last_voiced_end, self._last_voiced_time = self._sample_end(block_end, block_time, floor)

    def _refined_end(self) -> tuple[int, float]:
        """The end of the last loud 10 ms block at or before the detector's last voiced frame."""
        floor = self._end_floor()
        earliest = self._last_voiced_end - int(END_SEARCH_S * SAMPLE_RATE)
        for block_end, block_time, level in reversed(self._levels):
            if block_end > self._last_voiced_end:
                continue
            if block_end <= max(earliest, self._start_sample):
                break
            if level >= floor:
                return self._sample_end(block_end, block_time, floor)
        return self._last_voiced_end, self._last_voiced_time
