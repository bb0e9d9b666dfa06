"""One call's conversation: caller frames in, agent audio out, a ledger per turn.

Transport-free.  A transport feeds `AudioFrame`s (16 kHz mono, stamped with
their arrival time) through `push_frame`, pulls agent audio from `playout`
on its own paced clock, and listens to events.  Turn state:

    listening → caller_speaking → thinking → agent_speaking → listening

Work is moved into the endpointing silence: when the caller falls silent the
final transcription starts at once (`stt.early_final`), and when it is done
the LLM and TTS start speculatively (`llm.speculate`), their audio held back.
If the hangover expires, that work is committed and the first audio goes out
at once; if the caller goes on, it is cancelled and the ledger counts the
waste.

Barge-in (see BargeIn below): caller voice while the agent speaks pauses the
agent's audio at once; enough speech (and words, if required) turns the pause
into an interruption — queued audio flushed, LLM/TTS cancelled, history cut
to what was heard — otherwise (a cough, "mm-hmm") the agent resumes.

Tasks: transcriptions, replies and the responder belong to the conversation;
`aclose()` cancels and awaits them all.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable


from sub300.models.protocols import SAMPLE_RATE, ModelError, Transcript

from .audio import AudioFrame, int16_to_float32
from .audio_ring import AudioRing
from .config import Config
from .echo import EchoGuard
from .endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, VoiceOnset
from .engines import Engines
from .events import (
    BargeInEvent,
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
from .reply import Reply, ReplySettings

log = logging.getLogger(__name__)
Clock = Callable[[], float]
_WORDS = re.compile(r"[A-Za-z0-9]")
KEYPAD_TIMEOUT_S = 2.0


def has_words(text: str) -> bool:
    return bool(_WORDS.search(text))


#: what callers say to show they are listening; it must not stop the agent
BACKCHANNELS = {"mm", "mmm", "hmm", "mhm", "mm-hmm", "mm hmm", "uh-huh", "uh huh", "yeah", "yes", "yep",
                "okay", "ok", "right", "sure", "i see", "uh", "um", "ah", "oh", "you"}  # "you": Whisper's noise word


def is_backchannel(text: str) -> bool:
    return " ".join(re.findall(r"[a-z'-]+", text.lower())) in BACKCHANNELS


@dataclass
class _Transcription:
    task: asyncio.Task[Transcript]
    end_sample: int      # audio covered up to here
    started: float
    finished: float | None = None


@dataclass
class _Utterance:
    turn: int
    ledger: TurnLedger
    start_sample: int
    voiced_start: int
    candidate: _Transcription | None = None   # early final, launched when silence began
    speculation: Reply | None = None          # reply started on the candidate, held
    last_partial_at: float = 0.0
    partial: _Transcription | None = None
    relaunch_pending: bool = False
    #: set when this utterance paused the agent: it must earn the interruption
    barge_in: "BargeIn | None" = None


@dataclass
class _PendingTurn:
    ledger: TurnLedger
    transcription: _Transcription
    speculation: Reply | None
    barge_in: "BargeIn | None" = None


@dataclass
class BargeIn:
    """The caller's voice paused the agent; undecided until enough speech (or none)."""

    onset: float                 # arrival of the first voiced sample
    paused_at: float
    reply: Reply | None
    word_check: _Transcription | None = None
    committed: bool = False
    resolved: bool = False          # committed or resumed: decided once
    awaiting_words: int = 0         # short utterances whose transcript will decide


@dataclass
class Conversation:
    engines: Engines
    config: Config
    playout: PlayoutQueue
    clock: Clock = time.monotonic
    listeners: list[Callable[[Event], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        vad, interrupt = self.config.vad, self.config.interrupt
        self.endpointer = Endpointer(self.engines.vad, min_speech_ms=vad.min_speech_ms,
                                     hangover_ms=vad.hangover_ms, onset_ms=interrupt.onset_ms)
        self.history = History(self.config.llm.system_prompt, self.config.llm.history_turns)
        self.state = TurnState.LISTENING
        self.finished: list[TurnFinished] = []
        #: (voice onset, agent silent) of every barge-in, committed or not, for tests and benchmarks
        self.barge_ins: list[tuple[float, float]] = []
        self.false_interruptions = 0
        self._ring = AudioRing((vad.max_utterance_s + 5) * SAMPLE_RATE)
        self._pre_roll = vad.pre_roll_ms * SAMPLE_RATE // 1000
        self._turn_counter = 0
        self._utterance: _Utterance | None = None
        self._pending: asyncio.Queue[_PendingTurn] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._responder: asyncio.Task | None = None
        self._reply: Reply | None = None           # the reply being spoken (committed)
        self._barge: BargeIn | None = None
        self._answering = False                    # the responder is working on a turn
        self._keypad: list[str] = []               # DTMF digits not yet submitted
        self._keypad_at = 0.0
        self._closed = False
        self._echo = EchoGuard(self.playout.sample_rate, interrupt.echo_correlation) if interrupt.echo_guard else None
        if self._echo is not None:
            self.playout.on_played = self._echo.note_played
        self.echo_frames = 0

    # ------------------------------------------------------------ input side
    def push_frame(self, frame: AudioFrame) -> None:
        """Feed one frame of caller audio (call from the event loop)."""
        if self._closed:
            return
        suppressed = False
        if self._agent_active and self.config.interrupt.mode == "half_duplex":
            suppressed = True   # the caller cannot interrupt: hear nothing while speaking
        elif self._echo is not None and self._echo.is_echo(frame.samples, frame.timestamp):
            self.echo_frames += 1
            suppressed = True   # our own voice coming back: silence for the VAD
        self._ring.append(frame.samples)
        for event in self.endpointer.feed(frame.samples, frame.timestamp, suppressed=suppressed):
            if isinstance(event, VoiceOnset):
                self._on_voice_onset(event)
            elif isinstance(event, SpeechStarted):
                self._on_speech_started(event)
            elif isinstance(event, SpeechPaused):
                self._on_speech_paused(event)
            elif isinstance(event, SpeechResumed):
                self._on_speech_resumed()
            elif isinstance(event, SpeechEnded):
                self._on_speech_ended(event)
        utterance = self._utterance
        if utterance is not None:
            stale = utterance.candidate is not None and utterance.candidate.end_sample < self.endpointer.voiced_end_sample
            if stale and self.endpointer.paused and self.config.stt.early_final:
                self._launch_candidate(utterance)   # a soft last sound extended the speech
            self._maybe_partial(utterance)
            self._maybe_commit_barge_in(utterance)
            too_long = self._ring.end - utterance.start_sample >= self.config.vad.max_utterance_s * SAMPLE_RATE
            if too_long:  # a monologue: answer what we have rather than grow forever
                self.endpointer.in_speech = False
                self._on_speech_ended(SpeechEnded(utterance.start_sample, self._ring.end, frame.timestamp, frame.timestamp))
        self._maybe_resume_after_false_start()
        self._maybe_submit_keypad()

    @property
    def _agent_active(self) -> bool:
        """The agent has a reply in flight or audio still queued."""
        return self._reply is not None or not self.playout.idle

    # ------------------------------------------------------------ keypad
    def push_dtmf(self, digit: str) -> None:
        """A key the caller pressed (phones).  '#' or a 2 s pause ends the entry,
        which then becomes a turn the agent answers like a spoken one."""
        if self._closed:
            return
        if digit == "#":
            self._submit_keypad_entry()
            return
        self._keypad.append(digit)
        self._keypad_at = self.clock()

    def _submit_keypad_entry(self) -> None:
        digits, self._keypad = "".join(self._keypad), []
        if not digits:
            return
        self._turn_counter += 1
        ledger = TurnLedger(self._turn_counter, notes={"engines": self.engines.describe(), "keypad": digits})
        now = self.clock()
        ledger.mark("speech_end", now)
        ledger.mark("endpoint", now)
        text = f"I pressed {' '.join(digits)} on my keypad."
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        done.set_result(Transcript(text, 0.0, 0.0))
        self._pending.put_nowait(_PendingTurn(ledger, _Transcription(done, 0, now, now), None))  # type: ignore[arg-type]
        self._ensure_responder()
        self._set_state()

    def _maybe_submit_keypad(self) -> None:
        if self._keypad and self.clock() - self._keypad_at >= KEYPAD_TIMEOUT_S:
            self._submit_keypad_entry()

    # ------------------------------------------------------------ endpointing events
    def _on_voice_onset(self, event: VoiceOnset) -> None:
        if self._barge is None and self.playout.audible and self.config.interrupt.mode == "barge_in":
            self.playout.pause()
            self._barge = BargeIn(onset=event.time, paused_at=self.clock(), reply=self._reply)
            log.debug("voice while the agent speaks: paused")
            self._emit(BargeInEvent("paused", None))

    def _on_speech_started(self, event: SpeechStarted) -> None:
        self._turn_counter += 1
        ledger = TurnLedger(self._turn_counter, notes={"engines": self.engines.describe()})
        ledger.mark("speech_start", event.time)
        self._utterance = _Utterance(self._turn_counter, ledger, max(0, event.sample - self._pre_roll), event.sample)
        self._utterance.last_partial_at = self.clock()
        if self._barge is None and self._reply is not None and self.config.interrupt.mode == "barge_in":
            # The agent was thinking (no audio yet) and the caller goes on talking.
            self._barge = BargeIn(onset=event.time, paused_at=self.clock(), reply=self._reply)
        self._utterance.barge_in = self._barge
        self._set_state()

    def _on_speech_paused(self, event: SpeechPaused) -> None:
        utterance = self._utterance
        if utterance is not None and self.config.stt.early_final:
            self._launch_candidate(utterance)

    def _launch_candidate(self, utterance: _Utterance) -> None:
        """Transcribe what was said so far, unless a transcription of this utterance is running.

        One at a time: on a small CPU, overlapping runs slow each other down; the
        running one relaunches this when it ends if the caller is still silent.
        """
        running = [t for t in (utterance.candidate, utterance.partial) if t is not None and not t.task.done()]
        if running:
            if not utterance.relaunch_pending:
                utterance.relaunch_pending = True
                running[0].task.add_done_callback(lambda _t, u=utterance: self._relaunch_candidate(u))
            return
        if utterance.speculation is not None:  # built on a transcript that is now too short
            utterance.speculation.cancel()
            utterance.speculation = None
            utterance.ledger.notes["speculation_wasted"] = utterance.ledger.notes.get("speculation_wasted", 0) + 1
        candidate = self._transcribe(utterance, self._ring.end)
        utterance.candidate = candidate
        candidate.task.add_done_callback(lambda _t, u=utterance, c=candidate: self._maybe_speculate(u, c))

    def _relaunch_candidate(self, utterance: _Utterance) -> None:
        utterance.relaunch_pending = False
        stale = utterance.candidate is None or utterance.candidate.end_sample < self.endpointer.voiced_end_sample
        if self._utterance is utterance and self.endpointer.paused and not self._closed and stale:
            self._launch_candidate(utterance)

    def _on_speech_resumed(self) -> None:
        utterance = self._utterance
        if utterance is None:
            return
        if utterance.candidate is not None:
            # The caller went on: the early transcription is only a partial now.
            self._emit_partial_when_done(utterance, utterance.candidate)
            utterance.partial, utterance.candidate = utterance.candidate, None
        if utterance.speculation is not None:
            utterance.speculation.cancel()
            utterance.speculation = None
            utterance.ledger.notes["speculation_wasted"] = utterance.ledger.notes.get("speculation_wasted", 0) + 1

    def _on_speech_ended(self, event: SpeechEnded) -> None:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            return
        ledger = utterance.ledger
        ledger.mark("speech_end", event.speech_end)
        ledger.mark("endpoint", self.clock())
        barge = utterance.barge_in
        candidate = utterance.candidate
        speculation = utterance.speculation
        if candidate is not None and candidate.end_sample >= event.end_sample:
            transcription = candidate
            ledger.notes["early_final"] = True
        else:
            transcription = self._transcribe(utterance, self._ring.end)
            ledger.notes["early_final"] = False
            if speculation is not None:
                speculation.cancel()
                speculation = None
        ledger.mark("stt_start", transcription.started)
        if barge is not None and not barge.resolved:
            # Short speech while the agent talked: "Stop." interrupts, a cough or an
            # "mm-hmm" does not.  The transcript decides; the agent stays paused till then.
            barge.awaiting_words += 1
            transcription.task.add_done_callback(lambda t, u=utterance, b=barge: self._decide_on_words(t, u, b))
        ledger.notes["speculative"] = speculation is not None
        self._pending.put_nowait(_PendingTurn(ledger, transcription, speculation, barge))
        self._ensure_responder()
        self._set_state()

    # ------------------------------------------------------------ transcription
    def _transcribe(self, utterance: _Utterance, end_sample: int) -> _Transcription:
        audio = int16_to_float32(self._ring.slice(utterance.start_sample, end_sample))
        task = asyncio.ensure_future(asyncio.to_thread(self.engines.stt.transcribe, audio))
        transcription = _Transcription(task, end_sample, self.clock())

        def finished(_task: asyncio.Task) -> None:
            transcription.finished = self.clock()

        task.add_done_callback(finished)
        self._own(task)
        return transcription

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

    def _emit_partial_when_done(self, utterance: _Utterance, transcription: _Transcription) -> None:
        def done(task: asyncio.Task[Transcript]) -> None:
            if task.cancelled() or task.exception() is not None or self._closed:
                return
            # Only while that utterance is still being spoken: a late partial must not follow the final.
            if self._utterance is utterance and task.result().text:
                self._emit(TranscriptEvent(utterance.turn, task.result().text, final=False))

        transcription.task.add_done_callback(done)

    # ------------------------------------------------------------ speculation
    def _maybe_speculate(self, utterance: _Utterance, candidate: _Transcription) -> None:
        if (
            not self.config.llm.speculate
            or self._closed
            or self._utterance is not utterance          # already ended: the responder takes it
            or utterance.candidate is not candidate      # the caller went on since
            or candidate.task.cancelled()
            or candidate.task.exception() is not None
            or not has_words(candidate.task.result().text)
            or self._agent_active                        # one reply at a time
            or not self._pending.empty()
            or utterance.barge_in is not None
        ):
            return
        text = candidate.task.result().text.strip()
        utterance.speculation = self._new_reply(utterance.turn, text).start()
        self._own(utterance.speculation.task)

    def _new_reply(self, turn: int, text: str) -> Reply:
        llm = self.config.llm
        return Reply(
            turn=turn,
            messages=self.history.messages_for(text),
            llm=self.engines.llm,
            tts=self.engines.tts,
            playout=self.playout,
            clock=self.clock,
            emit=self._emit,
            settings=ReplySettings(llm.max_tokens, llm.temperature, self.config.tts.min_clause_chars,
                                   self.config.tts.first_piece_max_words),
            on_first_audio_out=lambda _: self._set_state(),
        )

    # ------------------------------------------------------------ barge-in
    def _maybe_commit_barge_in(self, utterance: _Utterance) -> None:
        barge = utterance.barge_in
        if barge is None or barge.resolved or not self.endpointer.in_speech:
            return
        interrupt = self.config.interrupt
        # voiced time only: the hangover silence after a cough must not count as speech
        spoken = (self.endpointer.voiced_end_sample - utterance.voiced_start) / SAMPLE_RATE * 1000
        if spoken < interrupt.min_speech_ms:
            return
        if not interrupt.require_words:
            self._commit_barge_in(barge, "caller speech")
        elif barge.word_check is None:
            barge.word_check = self._transcribe(utterance, self._ring.end)
            barge.word_check.task.add_done_callback(
                lambda t, u=utterance, b=barge: self._decide_on_words(t, u, b, final=False))

    def _decide_on_words(self, task: asyncio.Task, utterance: _Utterance, barge: BargeIn, final: bool = True) -> None:
        if final:
            barge.awaiting_words -= 1
        if barge.resolved or self._closed:
            return
        failed = task.cancelled() or task.exception() is not None
        text = "" if failed else task.result().text.strip()
        if has_words(text) and not is_backchannel(text):
            self._commit_barge_in(barge, f"caller said {text!r}")
        elif final and barge.awaiting_words == 0 and self._utterance is None:
            # Nothing else is being said: it was a cough, a click or "mm-hmm".
            utterance.ledger.notes["backchannel"] = text
            self._resume_agent(barge)

    def _commit_barge_in(self, barge: BargeIn, why: str) -> None:
        if barge.resolved:
            return
        barge.committed = barge.resolved = True
        dropped = self.playout.flush()
        reply = barge.reply
        if reply is not None:
            reply.interrupted = True
            reply.cancel()
        if self._barge is barge:
            self._barge = None
        self.barge_ins.append((barge.onset, self.playout.silenced_at or barge.paused_at))
        self._emit(BargeInEvent("interrupted", round(self.barge_in_reactions[-1] * 1000, 1)))
        log.info("barge-in (%s): dropped %.2f s of agent audio", why, dropped / self.playout.sample_rate)
        self._set_state()

    def _resume_agent(self, barge: BargeIn) -> None:
        if barge.resolved:
            return
        barge.resolved = True
        if self._barge is barge:
            self._barge = None
        self.false_interruptions += 1
        self.barge_ins.append((barge.onset, self.playout.silenced_at or barge.paused_at))
        self.playout.resume(rewind=True)
        self._emit(BargeInEvent("resumed", round(self.barge_in_reactions[-1] * 1000, 1)))
        log.info("false interruption: the agent resumes")
        self._set_state()

    def _maybe_resume_after_false_start(self) -> None:
        """A voice run too short to become speech paused the agent: resume after a quiet while."""
        barge = self._barge
        if (barge is None or barge.resolved or barge.awaiting_words
                or self.endpointer.in_speech or self._utterance is not None):
            return
        quiet_for = self.clock() - max(self.endpointer.last_voiced_time, barge.paused_at)
        if quiet_for * 1000 >= self.config.interrupt.resume_after_ms:
            self._resume_agent(barge)

    # ------------------------------------------------------------ answering
    def _ensure_responder(self) -> None:
        if self._responder is None or self._responder.done():
            self._responder = asyncio.ensure_future(self._respond_forever())
            self._own(self._responder)

    async def _respond_forever(self) -> None:
        while True:
            pending = await self._pending.get()
            self._answering = True
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
                if pending.speculation is not None:
                    pending.speculation.cancel()
                if self._reply is not None:
                    self._reply.cancel()
                self._reply = None
                self._answering = False
                self._set_state()

    async def _answer(self, pending: _PendingTurn) -> None:
        ledger = pending.ledger
        transcript = await pending.transcription.task
        ledger.mark("stt_final", pending.transcription.finished or self.clock())
        ledger.notes["stt_inference_ms"] = round(transcript.inference_seconds * 1000, 1)
        ledger.notes["stt_audio_s"] = round(transcript.audio_seconds, 2)
        text = transcript.text.strip()
        self._emit(TranscriptEvent(ledger.turn, text, final=True))
        if not has_words(text):
            self._emit(TurnDiscarded(ledger.turn, "no words in the transcript"))
            return
        if pending.barge_in is not None and not pending.barge_in.committed:
            self._emit(TurnDiscarded(ledger.turn, f"{text!r} while the agent spoke: not an interruption"))
            return
        reply = pending.speculation or self._new_reply(ledger.turn, text).start()
        pending.speculation = None
        if reply.task is not None and reply.task not in self._tasks:
            self._own(reply.task)
        self._reply = reply
        reply.commit(ledger)
        self._set_state()
        await asyncio.wait({reply.task})           # an interruption cancels the reply, not us
        if not reply.task.cancelled() and reply.task.exception() is not None:
            raise reply.task.exception()
        if not reply.interrupted:
            await self.playout.wait_idle()
        ledger.mark("last_audio_out", self.clock())
        heard = reply.heard_text() if reply.interrupted else reply.text
        ledger.notes["interrupted"] = reply.interrupted
        self.history.add(text, heard)
        self.playout.forget_turn(ledger.turn)
        finished = TurnFinished(ledger.turn, text, heard, ledger)
        self.finished.append(finished)
        log.info("turn %d: %r → %r%s, voice-to-voice %.0f ms", ledger.turn, text, heard,
                 " (interrupted)" if reply.interrupted else "", ledger.voice_to_voice_ms or -1)
        self._emit(finished)
        if not reply.interrupted:
            self._maybe_hang_up(ledger.turn, text)

    def _maybe_hang_up(self, turn: int, text: str) -> None:
        said = " ".join(re.findall(r"[a-z']+", text.lower()))
        for phrase in self.config.hangup_phrases:
            if re.search(rf"\b{re.escape(phrase.lower())}\b", said):
                self._emit(HangupRequested(turn, f"the caller said {phrase!r}"))
                return

    # ------------------------------------------------------------ state & events
    def _set_state(self) -> None:
        if self.endpointer.in_speech:
            state = TurnState.CALLER_SPEAKING
        elif self.playout.audible:
            state = TurnState.AGENT_SPEAKING
        elif self._answering or not self._pending.empty():
            state = TurnState.THINKING
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

    @property
    def speculating(self) -> bool:
        """A held reply is being prepared for the utterance in progress."""
        return self._utterance is not None and self._utterance.speculation is not None

    @property
    def barge_in_reactions(self) -> list[float]:
        """Seconds from the caller's voice onset to the agent's silence, per barge-in."""
        return [silent - onset for onset, silent in self.barge_ins]

    # ------------------------------------------------------------ lifecycle
    @property
    def busy(self) -> bool:
        """A turn is being spoken, transcribed, answered or played."""
        return (
            self.endpointer.in_speech
            or self._answering
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
