"""One call's conversation: caller frames in, agent audio out, a ledger per turn.

Transport-free.  A transport feeds `AudioFrame`s (16 kHz mono, stamped with
their arrival time) through `push_frame`, pulls agent audio from `playout`
on its own paced clock, and listens to events.  Turn state:

    listening → caller_speaking → thinking → agent_speaking → listening

Speech recognition starts early: when the caller falls silent the final
transcription is launched at once (`stt.early_final`) and is used if the
caller stays silent until the hangover expires; if they resume, the result
only serves as a partial.  Turns are answered one after the other by a
single responder task.

Tasks: the responder and the transcription tasks belong to the conversation;
`aclose()` cancels and awaits them all.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from models.protocols import SAMPLE_RATE, ModelError, Transcript

from .audio import AudioFrame, int16_to_float32
from .audio_ring import AudioRing
from .config import Config
from .endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from .engines import Engines
from .events import (
    Event,
    HangupRequested,
    StateChanged,
    TranscriptEvent,
    TurnDiscarded,
    TurnFailed,
    TurnFinished,
    TurnState,
)
from .history import History
from .ledger import TurnLedger
from .playout import PlayoutQueue
from .reply import speak_reply

log = logging.getLogger(__name__)
Clock = Callable[[], float]
_WORDS = re.compile(r"[A-Za-z0-9]")


@dataclass
class _Transcription:
    task: asyncio.Task[Transcript]
    end_sample: int      # audio covered up to here
    started: float


@dataclass
class _Utterance:
    turn: int
    ledger: TurnLedger
    start_sample: int
    candidate: _Transcription | None = None   # early final, launched when silence began
    last_partial_at: float = 0.0
    partial: _Transcription | None = None


@dataclass
class _PendingTurn:
    ledger: TurnLedger
    transcription: _Transcription


@dataclass
class Conversation:
    engines: Engines
    config: Config
    playout: PlayoutQueue
    clock: Clock = time.monotonic
    listeners: list[Callable[[Event], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        vad = self.config.vad
        self.endpointer = Endpointer(self.engines.vad, min_speech_ms=vad.min_speech_ms, hangover_ms=vad.hangover_ms)
        self.history = History(self.config.llm.system_prompt, self.config.llm.history_turns)
        self.state = TurnState.LISTENING
        self.finished: list[TurnFinished] = []
        self._ring = AudioRing((vad.max_utterance_s + 5) * SAMPLE_RATE)
        self._pre_roll = vad.pre_roll_ms * SAMPLE_RATE // 1000
        self._turn_counter = 0
        self._utterance: _Utterance | None = None
        self._pending: asyncio.Queue[_PendingTurn] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._responder: asyncio.Task | None = None
        self._responding = False
        self._closed = False

    # ------------------------------------------------------------ input side
    def push_frame(self, frame: AudioFrame) -> None:
        """Feed one frame of caller audio (call from the event loop)."""
        if self._closed:
            return
        self._ring.append(frame.samples)
        for event in self.endpointer.feed(frame.samples, frame.timestamp):
            if isinstance(event, SpeechStarted):
                self._on_speech_started(event)
            elif isinstance(event, SpeechPaused):
                self._on_speech_paused(event)
            elif isinstance(event, SpeechResumed):
                self._on_speech_resumed()
            elif isinstance(event, SpeechEnded):
                self._on_speech_ended(event)
        utterance = self._utterance
        if utterance is not None:
            self._maybe_partial(utterance)
            too_long = self._ring.end - utterance.start_sample >= self.config.vad.max_utterance_s * SAMPLE_RATE
            if too_long:  # a monologue: answer what we have rather than grow forever
                self._on_speech_ended(SpeechEnded(utterance.start_sample, self._ring.end, frame.timestamp, frame.timestamp))
                self.endpointer.in_speech = False

    def _on_speech_started(self, event: SpeechStarted) -> None:
        self._turn_counter += 1
        ledger = TurnLedger(self._turn_counter, notes={"engines": self.engines.describe()})
        ledger.mark("speech_start", event.time)
        self._utterance = _Utterance(self._turn_counter, ledger, max(0, event.sample - self._pre_roll))
        self._utterance.last_partial_at = self.clock()
        self._set_state()

    def _on_speech_paused(self, event: SpeechPaused) -> None:
        utterance = self._utterance
        if utterance is not None and self.config.stt.early_final:
            utterance.candidate = self._transcribe(utterance, self._ring.end)

    def _on_speech_resumed(self) -> None:
        utterance = self._utterance
        if utterance is not None and utterance.candidate is not None:
            # The caller went on: the early transcription is only a partial now.
            self._emit_partial_when_done(utterance, utterance.candidate)
            utterance.candidate = None

    def _on_speech_ended(self, event: SpeechEnded) -> None:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            return
        ledger = utterance.ledger
        ledger.mark("speech_end", event.speech_end)
        ledger.mark("endpoint", self.clock())
        candidate = utterance.candidate
        if candidate is not None and candidate.end_sample >= event.end_sample:
            transcription = candidate
            ledger.notes["early_final"] = True
        else:
            transcription = self._transcribe(utterance, self._ring.end)
            ledger.notes["early_final"] = False
        ledger.mark("stt_start", transcription.started)
        self._pending.put_nowait(_PendingTurn(ledger, transcription))
        self._ensure_responder()
        self._set_state()

    def _maybe_partial(self, utterance: _Utterance) -> None:
        interval = self.config.stt.partial_interval_ms / 1000
        if not interval or not self.endpointer.in_speech:
            return
        now = self.clock()
        busy = any(t is not None and not t.task.done() for t in (utterance.partial, utterance.candidate))
        if busy or now - utterance.last_partial_at < interval:
            return
        utterance.last_partial_at = now
        utterance.partial = self._transcribe(utterance, self._ring.end)
        self._emit_partial_when_done(utterance, utterance.partial)

    def _transcribe(self, utterance: _Utterance, end_sample: int) -> _Transcription:
        audio = int16_to_float32(self._ring.slice(utterance.start_sample, end_sample))
        task = asyncio.ensure_future(asyncio.to_thread(self.engines.stt.transcribe, audio))
        self._own(task)
        return _Transcription(task, end_sample, self.clock())

    def _emit_partial_when_done(self, utterance: _Utterance, transcription: _Transcription) -> None:
        def done(task: asyncio.Task[Transcript]) -> None:
            if task.cancelled() or task.exception() is not None or self._closed:
                return
            # Only while that utterance is still being spoken: a late partial must not follow the final.
            if self._utterance is utterance and task.result().text:
                self._emit(TranscriptEvent(utterance.turn, task.result().text, final=False))

        transcription.task.add_done_callback(done)

    # ------------------------------------------------------------ answering
    def _ensure_responder(self) -> None:
        if self._responder is None or self._responder.done():
            self._responder = asyncio.ensure_future(self._respond_forever())
            self._own(self._responder)

    async def _respond_forever(self) -> None:
        while True:
            pending = await self._pending.get()
            self._responding = True
            self._set_state()
            try:
                await self._answer(pending)
            except asyncio.CancelledError:
                raise
            except ModelError as error:
                log.error("turn %d failed: %s", pending.ledger.turn, error)
                self._emit(TurnFailed(pending.ledger.turn, str(error)))
            except Exception as error:  # a bug in one turn must not end the call
                log.exception("turn %d crashed", pending.ledger.turn)
                self._emit(TurnFailed(pending.ledger.turn, f"internal error: {error!r}"))
            finally:
                self._responding = False
                self._set_state()

    async def _answer(self, pending: _PendingTurn) -> None:
        ledger = pending.ledger
        transcript = await pending.transcription.task
        ledger.mark("stt_final", self.clock())
        ledger.notes["stt_inference_ms"] = round(transcript.inference_seconds * 1000, 1)
        ledger.notes["stt_audio_s"] = round(transcript.audio_seconds, 2)
        text = transcript.text.strip()
        self._emit(TranscriptEvent(ledger.turn, text, final=True))
        if not _WORDS.search(text):
            self._emit(TurnDiscarded(ledger.turn, "no words in the transcript"))
            return
        llm = self.config.llm
        reply = await speak_reply(
            turn=ledger.turn,
            messages=self.history.messages_for(text),
            llm=self.engines.llm,
            tts=self.engines.tts,
            playout=self.playout,
            ledger=ledger,
            clock=self.clock,
            emit=self._emit,
            max_tokens=llm.max_tokens,
            temperature=llm.temperature,
            min_clause_chars=self.config.tts.min_clause_chars,
            on_first_audio_out=lambda _: self._set_state(),
        )
        await self.playout.wait_idle()
        ledger.mark("last_audio_out", self.clock())
        self.history.add(text, reply.text)
        finished = TurnFinished(ledger.turn, text, reply.text, ledger)
        self.finished.append(finished)
        log.info("turn %d: %r → %r, voice-to-voice %.0f ms", ledger.turn, text, reply.text,
                 ledger.voice_to_voice_ms or -1)
        self._emit(finished)
        said = " ".join(re.findall(r"[a-z']+", text.lower()))
        for phrase in self.config.hangup_phrases:
            if re.search(rf"\b{re.escape(phrase.lower())}\b", said):
                self._emit(HangupRequested(ledger.turn, f"the caller said {phrase!r}"))
                break

    # ------------------------------------------------------------ state & events
    def _set_state(self) -> None:
        if self.endpointer.in_speech:
            state = TurnState.CALLER_SPEAKING
        elif self._responding or not self._pending.empty():
            state = TurnState.AGENT_SPEAKING if not self.playout.idle else TurnState.THINKING
        else:
            state = TurnState.LISTENING
        if state is not self.state:
            self.state = state
            self._emit(StateChanged(state))

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", type(event).__name__)

    def _own(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)

    # ------------------------------------------------------------ lifecycle
    @property
    def busy(self) -> bool:
        """A turn is being spoken, transcribed, answered or played."""
        return (
            self.endpointer.in_speech
            or self._responding
            or not self._pending.empty()
            or not self.playout.idle
        )

    async def wait_idle(self) -> None:
        while self.busy:
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        """End the call: cancel every task this conversation owns and wait for them."""
        self._closed = True
        self.playout.flush()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_task_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), ModelError):
        log.error("conversation task %s failed", task.get_name(), exc_info=task.exception())
