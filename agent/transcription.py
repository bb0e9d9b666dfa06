"""Transcription scheduling for one utterance: early final, partials, the final.

* **Early final** (`stt.early_final`): when the caller falls silent the final
  transcription starts as soon as `tail_samples` of audio after the refined
  end of speech have arrived (`stt.tail_ms`: a soft last sound below the
  endpointer's floor, as a quiet caller's final "-ce", still reaches the
  recogniser), inside the endpointing hangover; if the
  hangover then expires it *is* the final.  If a soft last sound extended the
  speech after it started (the endpointer moved the end of speech), it is
  stale and is launched again.
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
work is cancelled as one.  Engines are called through `transcribe()`, the one
seam between the conversation and a blocking recogniser.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sub300.models.protocols import SpeechRecognizer, Transcript
from sub300.models.scheduling import Urgency, WorkTicket

from .audio import int16_to_float32
from .audio_ring import AudioRing
from .endpointing import Endpointer
from .tasks import TaskOwner

Clock = Callable[[], float]


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
                 on_partial: Callable[[str], None], on_stale: Callable[[], None], tail_samples: int = 0):
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
        self._early_due = False              # paused: launch the early final once the tail has arrived

    # ------------------------------------------------------------ endpointer events
    def speech_paused(self) -> None:
        if self._early_final_on:
            self._early_due = True
            self._maybe_launch_early_final()

    def _covered(self) -> int:
        """The audio a final must cover: the refined end of speech plus the tail (what has arrived of it)."""
        return min(self._endpointer.voiced_end_sample + self._tail, self._ring.end)

    def _maybe_launch_early_final(self) -> None:
        if self._early_due and self._ring.end >= self._endpointer.voiced_end_sample + self._tail:
            self._early_due = False
            self._launch_early_final()

    def speech_resumed(self) -> None:
        """The caller went on: the early final is only a partial now."""
        self._early_due = False
        if self.early_final is not None:
            self.early_final.ticket.urgency = Urgency.SPECULATIVE     # nobody waits for a partial
            self._show_as_partial(self.early_final)
            self.partial, self.early_final = self.early_final, None

    def tick(self) -> None:
        """Once per caller frame: relaunch a stale early final, start a partial when due."""
        ep = self._endpointer
        if ep.paused:
            self._maybe_launch_early_final()
        stale = (self.early_final is not None and not self._early_due
                 and self.early_final.end_sample < ep.voiced_end_sample + self._tail)
        if stale and ep.paused and self._early_final_on:
            self._early_due = True       # a soft last sound extended the speech: again, with its tail
            self._maybe_launch_early_final()
        if not self._interval or not ep.in_speech:
            return
        now = self._clock()
        busy = any(t is not None and t.running for t in (self.partial, self.early_final))
        if busy or now - self._last_partial_at < self._interval:
            return
        self._last_partial_at = now
        if getattr(self._stt, "waiting", 0):
            return    # the shared recogniser has a queue: a partial (shown on the page only) is skipped, not queued
        self.partial = self._launch(Urgency.SPECULATIVE)
        self._show_as_partial(self.partial)

    def final(self, end_sample: int) -> tuple[Transcription, bool]:
        """The turn ended with speech up to ``end_sample``: its final transcription, and whether
        that is the early final (it covers all the speech)."""
        self.active = False
        early = self.early_final
        if early is not None and early.end_sample >= min(end_sample + self._tail, self._ring.end):
            early.ticket.urgency = Urgency.COMMITTED      # the caller waits for it now
            return early, True
        return self._launch(Urgency.COMMITTED), False

    def transcribe_now(self) -> Transcription:
        """A transcription of what was said so far (a barge-in's word check: the agent waits on it)."""
        return self._launch(Urgency.COMMITTED)

    # ------------------------------------------------------------ work
    def _launch(self, urgency: Urgency) -> Transcription:
        end = self._ring.end
        audio = int16_to_float32(self._ring.slice(self._start, end))
        transcription = Transcription(end, self._clock(), ticket=WorkTicket(urgency, clock=self._clock, label="stt"))
        transcription.task = self._owner.spawn(self._run(transcription, audio), name="stt")
        return transcription

    async def _run(self, transcription: Transcription, audio: np.ndarray) -> Transcript:
        try:
            return await transcribe(self._stt, audio, transcription.ticket)
        finally:
            transcription.finished = self._clock()

    def _launch_early_final(self) -> None:
        running = [t for t in (self.early_final, self.partial) if t is not None and t.running]
        if running:
            if not self._relaunch_pending:
                self._relaunch_pending = True
                running[0].then(lambda _text: self._relaunch())
            return
        self._on_stale()
        # SLACK, not SPECULATIVE: it is usually the final, due when the hangover ends
        early = self.early_final = self._launch(Urgency.SLACK)
        early.then(lambda text: self._early_final_done(early, text))

    def _relaunch(self) -> None:
        self._relaunch_pending = False
        ep = self._endpointer
        stale = self.early_final is None or self.early_final.end_sample < self._covered()
        if self.active and ep.paused and stale and not self._owner.closed:
            self._launch_early_final()

    def _early_final_done(self, early: Transcription, text: str | None) -> None:
        if text is not None and self.active and self.early_final is early:
            self._on_early_final(early, text)

    def _show_as_partial(self, transcription: Transcription) -> None:
        def done(text: str | None) -> None:
            # Only while the utterance is still being spoken: a late partial must not follow the final.
            if text and self.active:
                self._on_partial(text)
        transcription.then(done)
