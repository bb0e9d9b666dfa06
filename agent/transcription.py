"""Transcription scheduling for one utterance: early final, partials, the final.

* **Early final** (`stt.early_final`): the final transcription starts when
  the caller falls silent, inside the endpointing hangover; if the hangover
  then expires it *is* the final.  It starts on the audio there is, as soon
  as either the detector says the caller paused (`speech_paused`) or the
  last `SILENCE_ONSET_MS` of the utterance are quiet by energy (10 ms blocks
  under the endpointer's voice floor: webrtcvad calls frames voiced for
  ~100 ms after the voice stops, so the energy sees the silence sooner; a
  run that turns out to be a gap inside the speech is shown as a partial,
  and speculation starts on an early final only once the detector paused).
  Its audio is padded with digital silence to `stt.tail_ms` after the end
  of speech (Whisper pads with zeros anyway).  The tail of real audio that
  arrives after its launch (issue 9: a quiet caller's soft final "-ce" may
  lie below the endpointer's floor) is checked when it has arrived: if any
  10 ms block of it stands above the call's noise floor
  (`endpointing.NOISE_MARGIN_DB` over it) and within `TAIL_DROP_DB` of the
  utterance's peak, the early final is launched again with the tail, as it
  is when a soft last sound extended the speech after it started (the
  endpointer moved the end of speech).  Before issue 11 the early final
  waited for the detector and the tail; it now starts 48 ms (p50) after the
  true end of speech instead of 112 (scripts/bench_turns.py, spoken
  questions; 50 instead of 104 on read passages), and Whisper hears the
  same words (scripts/bench_quiet.py's cut, 120 clips at x1 and x0.05).
* **Partials** (`stt.partial_interval_ms`): while the caller speaks, a
  transcription of what was said so far every interval, shown on the page.
* **One at a time**: on a small CPU, overlapping Whisper runs slow each other
  down, so an early final that is due while another transcription of this
  utterance runs waits for it (`_relaunch_pending`) and starts when it ends,
  if the caller is still silent.
* **Deadline classes** (models/scheduling.py): every transcription carries a
  `WorkTicket` on the utterance's clock, which the shared STT service
  (models/stt_service.py) orders its queue by.  Partials are SPECULATIVE
  (shown on the page, nobody waits for them) and are skipped, not queued,
  while the shared recogniser has a queue; the early final is SLACK while
  the hangover runs (usually the final, due when the hangover ends) and is
  promoted to COMMITTED when `final()` takes it as the turn's final (demoted
  to SPECULATIVE when the caller goes on and it is only a partial); a final
  launched after the turn ended and a barge-in's word check are COMMITTED.

Every transcription is a task of the utterance's `TaskOwner`, so the turn's
work is cancelled as one.  Usage: each transcription that returns reports
its `Transcript.audio_seconds` to ``on_usage`` (partials, early finals, the
final, a barge-in's word check: work done, so re-transcription counts); one
that fails or is cancelled before it returns has no transcript and is not
counted.  Engines are called through `transcribe()`, the one
seam between the conversation and a blocking recogniser.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sub300.models.protocols import SpeechRecognizer, Transcript
from sub300.models.scheduling import Urgency, WorkTicket

from .audio import int16_to_float32, rms_dbfs
from .audio_ring import AudioRing
from .endpointing import BLOCK, END_DROP_DB, NOISE_MARGIN_DB, SILENCE_DBFS, Endpointer
from .tasks import TaskOwner

Clock = Callable[[], float]

#: quiet audio (10 ms blocks under the endpointer's voice floor) at the end of the utterance after
#: which the early final starts, before the detector says the caller paused (ms; 0 = wait for the detector)
SILENCE_ONSET_MS = 40
#: a block of the tail counts as sound (the early final is launched again with it) when it is at most
#: this far under the utterance's loudest block (and above the call's noise floor); on the spoken
#: questions of scripts/bench_turns.py the tail's blocks are 41-51 dB under the peak in its first
#: 10 ms (the voice decaying) and 52-71 dB under from 40 ms on
TAIL_DROP_DB = 50.0
#: False: the early final waits for the tail and covers it, as before issue 11 (for benchmarks' comparisons)
START_BEFORE_TAIL = True


async def transcribe(stt: SpeechRecognizer, audio: np.ndarray, ticket: WorkTicket | None = None) -> Transcript:
    """Run the recogniser on ``audio`` (float32 mono 16 kHz) without blocking the event loop.

    A recogniser with its own coroutine ``transcribe_async(audio, ticket=)``
    (the shared STT service, a remote engine, a test fake on virtual time) is
    awaited and marks the ticket itself; a blocking one runs in a worker
    thread, the ticket marked around it (no queue: submitted = started).
    Errors are the engine's (`ModelError`).
    """
    native = getattr(stt, "transcribe_async", None)
    if native is not None:
        return await native(audio, ticket=ticket)
    if ticket is not None:
        ticket.mark_started()
    try:
        return await asyncio.to_thread(stt.transcribe, audio)
    finally:
        if ticket is not None:
            ticket.mark_finished()


@dataclass(eq=False)
class Transcription:
    """One run of the recogniser over the utterance's audio up to ``end_sample``."""

    end_sample: int          # audio covered up to here (absolute sample index)
    started: float           # clock seconds
    task: asyncio.Future[Transcript] = field(init=False)
    finished: float | None = None   # clock seconds; set when the engine returned or failed
    #: the engine request's deadline class and queue/work times (a keypad entry's is never used)
    ticket: WorkTicket = field(default_factory=lambda: WorkTicket(label="stt"))

    @classmethod
    def ready(cls, text: str, at: float) -> Transcription:
        """A transcription that is already done (a keypad entry: the text is known)."""
        t = cls(0, at, finished=at)
        t.task = asyncio.get_running_loop().create_future()
        t.task.set_result(Transcript(text, 0.0, 0.0))
        return t

    @property
    def running(self) -> bool:
        return not self.task.done()

    def text(self) -> str | None:
        """The transcript's text as the engine gave it, once done; None while running, or if it
        failed or was cancelled."""
        if not self.task.done() or self.task.cancelled() or self.task.exception() is not None:
            return None
        return self.task.result().text

    def then(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(self.text())`` once done (soon, if it is already)."""
        self.task.add_done_callback(lambda _task: callback(self.text()))


class UtteranceTranscriber:
    """Schedules the transcriptions of one utterance (from ``start_sample`` of ``ring``).

    Callbacks: ``on_early_final(t, text)`` when the current early final is
    done while the utterance goes on (speculation may start on it);
    ``on_partial(text)`` for a partial transcript; ``on_stale()`` when a new
    early final starts (a reply built on an earlier one is wasted).
    """

    def __init__(self, *, stt: SpeechRecognizer, ring: AudioRing, endpointer: Endpointer, start_sample: int,
                 owner: TaskOwner, clock: Clock, early_final: bool, partial_interval_s: float,
                 on_early_final: Callable[[Transcription, str], None],
                 on_partial: Callable[[str], None], on_stale: Callable[[], None], tail_samples: int = 0,
                 silence_onset_ms: int | None = None, on_usage: Callable[[float], None] | None = None):
        """``silence_onset_ms``: see `SILENCE_ONSET_MS` (None: that default); ``on_usage(seconds)``:
        the audio seconds of every transcription that returned (the STT usage)."""
        self._on_usage = on_usage
        self._stt, self._ring, self._endpointer = stt, ring, endpointer
        self._start = start_sample
        self._owner, self._clock = owner, clock
        self._early_final_on, self._interval = early_final, partial_interval_s
        self._on_early_final, self._on_partial, self._on_stale = on_early_final, on_partial, on_stale
        self.early_final: Transcription | None = None
        self.partial: Transcription | None = None
        self.active = True                  # the utterance is still being spoken
        self._relaunch_pending = False
        self._last_partial_at = clock()
        self._tail = tail_samples
        onset_ms = SILENCE_ONSET_MS if silence_onset_ms is None else silence_onset_ms
        self._onset = onset_ms * 16 if onset_ms else 0      # samples (16 kHz)
        self._wait_tail = not START_BEFORE_TAIL
        if self._wait_tail:
            self._onset = 0
        self._levels_end = start_sample     # the utterance's audio measured in 10 ms blocks up to here
        self._peak_db = SILENCE_DBFS        # its loudest block
        self._quiet_from: int | None = None  # start of the run of quiet blocks at its end (None: loud)
        self._announced: Transcription | None = None   # the early final on_early_final was called for

    # ------------------------------------------------------------ endpointer events
    def speech_paused(self) -> None:
        """The detector says the caller paused: the early final starts now on the audio there is
        (unless one that still covers the speech runs or is done)."""
        if not self._early_final_on:
            return
        early = self.early_final
        if self._wait_tail:
            return      # tick() launches it once the tail has arrived
        if early is None or not self._covers(early, self._endpointer.voiced_end_sample):
            self._launch_early_final()
        elif early.task.done():
            self._early_final_done(early, early.text())

    def speech_resumed(self) -> None:
        """The caller went on: the early final is only a partial now."""
        if self.early_final is not None:
            self.early_final.ticket.urgency = Urgency.SPECULATIVE     # nobody waits for a partial
            self._show_as_partial(self.early_final)
            self.partial, self.early_final = self.early_final, None

    def tick(self) -> None:
        """Once per caller frame: start the early final at a silence onset, relaunch it when the
        tail holds sound or the end of speech moved, start a partial when due."""
        ep = self._endpointer
        self._measure()
        if self._early_final_on and self.active:
            early = self.early_final
            if ep.paused:
                tail_in = self._ring.end >= ep.voiced_end_sample + self._tail
                if (early is None and (tail_in or not self._wait_tail)) or (
                        tail_in and early is not None and not self._covers(early, ep.voiced_end_sample)):
                    self._launch_early_final()
            elif ep.in_speech:
                if early is not None and self._quiet_from is None:
                    self._on_stale()          # the energy came back: a gap inside the speech
                    self.speech_resumed()
                    self._last_partial_at = self._clock()
                elif (early is None and self._onset and self._quiet_from is not None
                      and self._ring.end - self._quiet_from >= self._onset and not self._busy()):
                    self._launch_early_final()
        if not self._interval or not ep.in_speech or ep.paused:
            return
        now = self._clock()
        if self._busy() or now - self._last_partial_at < self._interval:
            return
        self._last_partial_at = now
        if getattr(self._stt, "waiting", 0):
            return    # the shared recogniser has a queue: a partial (shown on the page only) is skipped, not queued
        self.partial = self._launch(Urgency.SPECULATIVE)
        self._show_as_partial(self.partial)

    def _busy(self) -> bool:
        return any(t is not None and t.running for t in (self.partial, self.early_final))

    # ------------------------------------------------------------ levels
    def _block_levels(self, start: int, end: int) -> list[float]:
        audio = self._ring.slice(start, end)
        return [rms_dbfs(audio[k:k + BLOCK], floor=SILENCE_DBFS) for k in range(0, len(audio) - BLOCK + 1, BLOCK)]

    def _measure(self) -> None:
        """Levels of the utterance's new whole 10 ms blocks: its peak, and the quiet run at its end."""
        end = self._levels_end + (self._ring.end - self._levels_end) // BLOCK * BLOCK
        if end <= self._levels_end:
            return
        levels = self._block_levels(self._levels_end, end)
        self._peak_db = max([self._peak_db, *levels])
        quiet_below = max(self._endpointer.noise_floor_db + NOISE_MARGIN_DB, self._peak_db - END_DROP_DB)
        for k, level in enumerate(levels):
            if level >= quiet_below:
                self._quiet_from = None
            elif self._quiet_from is None:
                self._quiet_from = self._levels_end + k * BLOCK
        self._levels_end = end

    def _covers(self, t: Transcription, end_sample: int) -> bool:
        """Whether ``t`` holds all of the speech up to ``end_sample``: its audio reaches that far, and
        what it lacks of the tail (``end_sample`` + `stt.tail_ms`, as far as it has arrived) holds no
        sound (a tail still arriving is judged on what has arrived so far)."""
        if t.end_sample < end_sample:
            return False
        upto = min(end_sample + self._tail, self._ring.end)
        if t.end_sample >= upto:
            return True
        if self._wait_tail:
            return False
        sound = max(self._endpointer.noise_floor_db + NOISE_MARGIN_DB, self._peak_db - TAIL_DROP_DB)
        return all(level < sound for level in self._block_levels(t.end_sample, upto))

    def final(self, end_sample: int) -> tuple[Transcription, bool]:
        """The turn ended with speech up to ``end_sample``: its final transcription, and whether
        that is the early final (it covers all the speech)."""
        self.active = False
        early = self.early_final
        if early is not None and self._covers(early, end_sample):
            early.ticket.urgency = Urgency.COMMITTED      # the caller waits for it now
            return early, True
        return self._launch(Urgency.COMMITTED), False

    def transcribe_now(self) -> Transcription:
        """A transcription of what was said so far (a barge-in's word check: the agent waits on it)."""
        return self._launch(Urgency.COMMITTED)

    # ------------------------------------------------------------ work
    def _launch(self, urgency: Urgency, pad_to: int = 0) -> Transcription:
        """A transcription of the utterance so far, padded with digital silence to ``pad_to`` (a sample)."""
        end = self._ring.end
        audio = int16_to_float32(self._ring.slice(self._start, end))
        if pad_to > end:
            audio = np.concatenate([audio, np.zeros(pad_to - end, np.float32)])
        transcription = Transcription(end, self._clock(), ticket=WorkTicket(urgency, clock=self._clock, label="stt"))
        transcription.task = self._owner.spawn(self._run(transcription, audio), name="stt")
        return transcription

    async def _run(self, transcription: Transcription, audio: np.ndarray) -> Transcript:
        try:
            transcript = await transcribe(self._stt, audio, transcription.ticket)
        finally:
            transcription.finished = self._clock()
        if self._on_usage is not None:
            self._on_usage(transcript.audio_seconds)
        return transcript

    def _launch_early_final(self) -> None:
        running = [t for t in (self.early_final, self.partial) if t is not None and t.running]
        if running:
            if not self._relaunch_pending:
                self._relaunch_pending = True
                running[0].then(lambda _text: self._relaunch())
            return
        self._on_stale()
        # SLACK, not SPECULATIVE: it is usually the final, due when the hangover ends
        ep = self._endpointer
        end = ep.voiced_end_sample if ep.paused else (self._quiet_from or self._ring.end)
        early = self.early_final = self._launch(Urgency.SLACK, pad_to=0 if self._wait_tail else end + self._tail)
        early.then(lambda text: self._early_final_done(early, text))

    def _relaunch(self) -> None:
        self._relaunch_pending = False
        ep = self._endpointer
        stale = self.early_final is None or not self._covers(self.early_final, ep.voiced_end_sample)
        if self.active and ep.paused and stale and not self._owner.closed:
            self._launch_early_final()

    def _early_final_done(self, early: Transcription, text: str | None) -> None:
        """Speculation may start on it: only once the detector says the caller paused (an early final
        started by energy alone may still turn out to be a gap inside the speech)."""
        if (text is not None and self.active and self.early_final is early and self._endpointer.paused
                and self._announced is not early):
            self._announced = early
            self._on_early_final(early, text)

    def _show_as_partial(self, transcription: Transcription) -> None:
        def done(text: str | None) -> None:
            # Only while the utterance is still being spoken: a late partial must not follow the final.
            if text and self.active:
                self._on_partial(text)
        transcription.then(done)
