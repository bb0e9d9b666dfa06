"""One call's conversation: caller frames in, agent audio out, a ledger per turn.

Transport-free.  A transport feeds `AudioFrame`s (16 kHz mono, stamped with
their arrival time) through `push_frame`, pulls agent audio from `playout`
on its own paced clock, and listens to events.

The conversation wires the parts; each decides on its own:

* `Endpointer` — turn boundaries, the true end of speech (endpointing.py);
* `UtteranceTranscriber` — early final and partials of a turn (transcription.py);
* `Interruptions` — barge-in: the agent paused at the caller's voice onset,
  then interrupted or resumed as the `BargeIn` policy decides
  (interruptions.py, barge_in.py);
* `Keypad` — DTMF entries become turns (keypad.py);
* `Responder` — queued turns answered one at a time, each by a `Reply`
  (LLM → TTS → playout, possibly started speculatively) (responder.py, reply.py);
* `TurnStateMachine` — the state the page shows, driven by events (turn_state.py).

One caller frame: echo / half-duplex suppression → the endpointer's events
(a turn opens, pauses, resumes, ends) → the speaking turn's transcriber, its
barge-in speech check and the monologue cap → the barge-in quiet check →
the keypad's timeout.

Work is moved into the endpointing silence: the early final transcription,
and on it a speculative reply whose audio is held until the hangover expires
(then it goes out at once) or thrown away if the caller goes on (the ledger
counts the waste).  Each caller turn owns its work in one `TaskOwner`
(transcriptions, word checks, the speculation, the reply), cancelled as one
when the turn has been answered; the conversation's owner holds them all,
and `aclose()` ends everything.

Usage: the call's `CallMeter` (metering.py) is charged as work is done
(caller frames fed, transcriptions, the replies' tokens and TTS text, the
agent audio the transport pulled); a turn's report carries its share in
``ledger.usage`` (filled in `_emit` just before its `TurnFinished`,
`TurnFailed` or `TurnDiscarded` reaches the listeners), and `aclose()`
emits the rest as `CallUsage`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sub300.models.protocols import SAMPLE_RATE, ModelError

from . import speech_guard
from .audio import AudioFrame, StreamResampler, int16_to_float32
from .audio_ring import AudioRing
from .barge_in import BargeInRules
from .behaviour import DEFAULT_BEHAVIOUR, Behaviour
from .call_limits import CallLimits, LimitReached
from .config import Config
from .echo import EchoGuard
from .end_of_turn import EndOfTurn, TurnTiming
from .endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, VoiceOnset
from .engines import Engines
from .events import (
    AgentSpeech,
    CallHeld,
    CallRecorded,
    CallResumed,
    CallUsage,
    Event,
    HangupRequested,
    StateChanged,
    TranscriptEvent,
    TurnDiscarded,
    TurnFailed,
    TurnFinished,
)
from .history import History
from .interruptions import Interruptions
from .keypad import Keypad, as_text
from .ledger import TurnLedger
from .log_format import bind_turn
from .metering import CallMeter
from .playout import PlayoutQueue
from .reply import ReplySettings
from .reply import _tts_chunks as tts_chunks
from .responder import Responder
from .tasks import TaskOwner
from .tools import check_tools
from .transcription import Transcription, UtteranceTranscriber
from .turn import Turn
from .turn_state import TurnEvent as E
from .turn_state import TurnState, TurnStateMachine
from .usage import STT_AUDIO_S, TTS_CHARS, add_usage
from .words import has_words

if TYPE_CHECKING:
    from .recording import CallRecording

log = logging.getLogger(__name__)
Clock = Callable[[], float]
#: `end_politely`'s reason when the server drains (sub300/drain.py); a `HangupRequested` carries it
DRAIN = "drain"
#: how often (s) `end_politely` looks whether the current turn is done (the 20 ms of a playout frame)
_TURN_DONE_POLL_S = 0.02


@dataclass
class Conversation:
    engines: Engines
    config: Config
    playout: PlayoutQueue
    clock: Clock = time.monotonic
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    #: the user's agent: instructions, tools, hooks (agent/behaviour.py); the hooks hear every event after
    #: the transport's own listeners
    behaviour: Behaviour = DEFAULT_BEHAVIOUR

    def __post_init__(self) -> None:
        self.listeners = [*self.listeners, *self.behaviour.listeners]
        check_tools(self.engines.llm, self.behaviour.tools)   # tools on a model that cannot call them: an error
        vad, interrupt = self.config.vad, self.config.interrupt
        self.end_of_turn = self._adaptive_end_of_turn()
        self.endpointer = Endpointer(self.engines.vad, min_speech_ms=vad.min_speech_ms,
                                     hangover_ms=self.config.turn.incomplete_hangover_ms if self.end_of_turn
                                     else vad.hangover_ms, onset_ms=interrupt.onset_ms,
                                     relative=vad.relative_end)
        self.history = History(self.behaviour.system_prompt(self.config.llm.system_prompt), self.config.llm.history_turns)
        self.turn_state = TurnStateMachine()
        self.echo_frames = 0
        self._ring = AudioRing((vad.max_utterance_s + 5) * SAMPLE_RATE)
        self._pre_roll = vad.pre_roll_ms * SAMPLE_RATE // 1000
        self._tasks = TaskOwner("conversation", expected=(ModelError,))
        self._turn_count = 0
        self._speaking: Turn | None = None        # the turn the caller is speaking
        self.meter = CallMeter(lambda: self.playout.played_total, self.playout.sample_rate, SAMPLE_RATE)
        self._ledgers: dict[int, TurnLedger] = {}   # turns not reported yet (a TurnDiscarded gets its ledger)
        llm, tts = self.config.llm, self.config.tts
        self._responder = Responder(
            owner=self._tasks, llm=self.engines.llm, tts=self.engines.tts, playout=self.playout, history=self.history,
            settings=ReplySettings(llm.max_tokens, llm.temperature, tts.min_clause_chars, tts.first_piece_max_words,
                                  fallback_text=llm.fallback_text, tool_timeout_s=llm.tool_timeout_s,
                                  max_tool_rounds=llm.max_tool_rounds, tool_filler_ms=llm.tool_filler_ms,
                                  tool_filler_text=llm.tool_filler_text),
            emit=self._emit, advance=self._advance, clock=self.clock, hangup_phrases=self.config.hangup_phrases,
            charge=self.meter.charge, tools=self.behaviour.tools)
        self.interruptions = Interruptions(
            BargeInRules(interrupt.min_speech_ms, interrupt.require_words, interrupt.resume_after_ms),
            enabled=interrupt.mode == "barge_in", playout=self.playout, clock=self.clock, emit=self._emit,
            advance=self._advance, caller_in_turn=lambda: self._speaking is not None)
        self._keypad = Keypad()
        self._closed = False
        self.held = False                         # the call is on hold (`hold`)
        self.limits = CallLimits.from_config(self.config.call, self.clock())
        self.ended_by: LimitReached | None = None   # the call limit that ended this call (call_limits.py)
        self._farewell = TaskOwner("farewell", expected=(ModelError,))
        self._echo = EchoGuard(self.playout.sample_rate, interrupt.echo_correlation) if interrupt.echo_guard else None
        self.recording: CallRecording | None = None
        self._listen_to_playout()
        self._on_endpoint: dict[type, Callable[[Any], None]] = {VoiceOnset: self._on_voice_onset, SpeechStarted: self._on_speech_started,
                             SpeechPaused: self._on_speech_paused, SpeechResumed: self._on_speech_resumed,
                             SpeechEnded: self._on_speech_ended}

    def _adaptive_end_of_turn(self) -> EndOfTurn | None:
        """The adaptive end-of-turn policy (turn.detector = "smart-turn"), or None: the VAD's fixed hangover."""
        if self.config.turn.detector == "vad":
            return None
        if self.engines.turn is None:
            log.warning("turn.detector = %r but no turn model is loaded: turns end after the VAD hangover (%d ms)",
                        self.config.turn.detector, self.config.vad.hangover_ms)
            return None
        return EndOfTurn(self.engines.turn, TurnTiming.from_config(self.config), clock=self.clock,
                         decide=self._decide_hangover)

    def _decide_hangover(self, hangover_ms: int, pause: int) -> None:
        """The end-of-turn policy chose this pause's hangover: the turn may end now."""
        for event in self.endpointer.decide_hangover(hangover_ms, pause, self.clock()):
            self._on_endpoint[type(event)](event)

    def record_to(self, recording: CallRecording | None) -> None:
        """Record the call from now on (agent/recording.py): the caller's frames and the agent's as played."""
        self.recording = recording
        self._listen_to_playout()

    def _listen_to_playout(self) -> None:
        # only when the echo guard or a recording listens: an idle queue then makes no silence for nobody
        wanted = self._echo is not None or self.recording is not None
        self.playout.on_played = self._on_played if wanted else None

    def _on_played(self, pcm, at: float) -> None:
        """Every frame the transport took from the playout queue, agent audio or silence."""
        if self._echo is not None:
            self._echo.note_played(pcm, at)
        if self.recording is not None:
            self.recording.agent(pcm)

    # ------------------------------------------------------------ input
    def push_frame(self, frame: AudioFrame) -> None:
        """Feed one frame of caller audio (call from the event loop)."""
        if not self._closed:
            self.meter.caller_audio(len(frame.samples))   # received, speech or not (usage: caller audio)
            if self.recording is not None:
                self.recording.caller(frame.samples)
        if self._closed or self.ended_by is not None:
            return
        suppressed = False
        if self.held:   # on hold: the caller's audio (music on hold) is no turn and no barge-in
            frame = AudioFrame(frame.samples * 0, frame.timestamp)
            suppressed = True
        if self._agent_active and self.config.interrupt.mode == "half_duplex":
            suppressed = True   # the caller cannot interrupt: hear nothing while speaking
        elif self._echo is not None and self._echo.is_echo(frame.samples, frame.timestamp):
            self.echo_frames += 1
            suppressed = True   # our own voice coming back: silence for the VAD
        self._ring.append(frame.samples)
        for event in self.endpointer.feed(frame.samples, frame.timestamp, suppressed=suppressed):
            self._on_endpoint[type(event)](event)
        turn = self._speaking
        if turn is not None:
            turn.stt.tick()
            if turn.barge_in is not None and self.endpointer.in_speech:
                # voiced time only: the hangover silence after a cough must not count as speech
                voiced_ms = (self.endpointer.voiced_end_sample - turn.voiced_start) / SAMPLE_RATE * 1000
                self.interruptions.voiced(turn, voiced_ms, self._sounds_like_speech(turn))
            if self._ring.end - turn.start_sample >= self.config.vad.max_utterance_s * SAMPLE_RATE:
                # a monologue: answer what we have rather than grow forever
                self.endpointer.in_speech = False
                self._on_speech_ended(SpeechEnded(turn.start_sample, self._ring.end, frame.timestamp, frame.timestamp))
        self.interruptions.tick(self.clock(), self.endpointer.last_voiced_time,
                                caller_in_turn=self.endpointer.in_speech or self._speaking is not None)
        if (digits := self._keypad.tick(self.clock())) is not None:
            self._queue_keypad_turn(digits)
        self.check_limits()

    def _sounds_like_speech(self, turn: Turn) -> Callable[[], bool] | None:
        """For the barge-in policy: is the turn's voiced audio so far speech, or a steady sound
        (line noise, a tone) that must not interrupt the agent by its length alone?"""
        if not self.config.vad.speech_guard:
            return None
        return lambda: speech_guard.check(self._ring.slice(turn.voiced_start, self.endpointer.voiced_end_sample)).is_speech

    def check_limits(self) -> LimitReached | None:
        """Run on every caller frame, and by a transport's timer when frames may stop (call_limits.py).

        A limit reached stops the conversation's work, says the goodbye line
        and then emits `HangupRequested` (reason "inactivity" | "max_duration");
        returns the limit, once (None before, and after)."""
        if self._closed or self.ended_by is not None:
            return None
        now = self.clock()
        if self.busy or self.held:   # on hold the caller will come back: that is no inactivity
            self.limits.activity(now)
        reached = self.limits.expired(now)
        if reached is not None:
            self.ended_by = reached
            log.info("call limit reached: %s", reached.reason)
            self._tasks.cancel()        # the turns and the reply in flight: the goodbye replaces them
            self.playout.flush()
            self._farewell.spawn(self._say_goodbye(reached), name="goodbye")
        return reached

    async def _say_goodbye(self, reached: LimitReached) -> None:
        self._turn_count += 1
        turn = self._turn_count
        try:
            if reached.goodbye.strip():
                self._emit(AgentSpeech(turn, reached.goodbye))
                self.meter.charge(None, {TTS_CHARS: len(reached.goodbye)})
                resampler = StreamResampler(self.engines.tts.sample_rate, self.playout.sample_rate)
                chunks = tts_chunks(self.engines.tts, reached.goodbye)
                try:
                    async for chunk in chunks:
                        self.playout.push(resampler.process(chunk), turn=turn)
                finally:
                    await chunks.aclose()
                self.playout.push(resampler.flush(), turn=turn)
                await self.playout.wait_idle()
        except ModelError as error:
            log.warning("goodbye line not spoken: %s", error)
        finally:
            self._emit(HangupRequested(turn, reached.reason))

    def end_politely(self, reason: str, goodbye: str) -> bool:
        """End the call after the current turn (the server drains: ``reason`` `DRAIN`).

        The call-limit path of `check_limits`, except that the work in flight
        is not cancelled: from now on no caller audio or key makes a new turn
        (words the caller is still speaking are dropped with their turn's
        work); the turns already ended are answered and their reply plays
        out; then ``goodbye`` is said ('' = none) and `HangupRequested`
        (``reason``) emitted, as after a call limit.  Returns False (and does
        nothing) when the call is already ending (a limit, or closed)."""
        if self._closed or self.ended_by is not None:
            return False
        self.ended_by = LimitReached(reason, self.clock(), goodbye)
        speaking, self._speaking = self._speaking, None
        if speaking is not None:   # the caller's unfinished words: no turn (nor its speculative reply)
            speaking.tasks.cancel()
        log.info("ending the call politely (%s) after the current turn", reason)
        self._farewell.spawn(self._goodbye_after_turn(self.ended_by), name="goodbye")
        return True

    async def _goodbye_after_turn(self, reached: LimitReached) -> None:
        responder = self._responder
        while responder.answering or responder.waiting or not self.playout.idle:
            await asyncio.sleep(_TURN_DONE_POLL_S)
        await self._say_goodbye(reached)

    def hold(self) -> None:
        """The far end put the call on hold (SIP: RFC 3264 §8.4): the agent's audio stops where it is
        (`PlayoutQueue.hold`; nothing is pulled, so nothing counts as heard) and caller audio is fed as
        silence, so no turn or barge-in starts.  The turn state stays; `CallHeld` is emitted.  Idempotent."""
        if self.held or self._closed:
            return
        self.held = True
        self.playout.hold()
        log.info("call on hold: %.2f s of agent audio waits", self.playout.queued_samples / self.playout.sample_rate)
        self._emit(CallHeld())

    def unhold(self, drop_rest: bool = False) -> None:
        """The hold ended.  The agent's audio continues from the sample where it stopped, or with
        ``drop_rest`` the rest is dropped and the reply in flight is cancelled like a committed barge-in
        (the history keeps only the heard text).  Emits `CallResumed`.  Idempotent."""
        if not self.held or self._closed:
            return
        self.held = False
        dropped, cut = 0, False
        if drop_rest:
            reply = self._responder.reply
            dropped = self.playout.flush()
            cut = bool(dropped) or reply is not None
            if reply is not None:
                reply.interrupted = True
                reply.cancel()
        self.playout.unhold()
        log.info("call resumed%s", f": dropped {dropped / self.playout.sample_rate:.2f} s of agent audio" if cut else "")
        self._emit(CallResumed(round(dropped / self.playout.sample_rate, 3)))
        self._advance(E.AGENT_SILENCED if cut else E.AGENT_AUDIBLE if self.playout.audible else None)

    def push_dtmf(self, digit: str) -> None:
        """A key the caller pressed (phones); see keypad.py for when an entry becomes a turn."""
        if not self._closed and self.ended_by is None and (digits := self._keypad.press(digit, self.clock())) is not None:
            self._queue_keypad_turn(digits)

    @property
    def _agent_active(self) -> bool:
        """The agent has a reply in flight or audio still queued."""
        return self._responder.reply is not None or not self.playout.idle

    # ------------------------------------------------------------ caller turns
    def _new_turn(self, **notes) -> Turn:
        self._turn_count += 1
        n = self._turn_count
        bind_turn(n)   # this context's log lines (and the tasks it starts for the turn) carry the turn
        ledger = self._ledgers[n] = TurnLedger(n, notes={"engines": self.engines.describe(), **notes})
        return Turn(n, ledger, self._tasks.child(f"turn{n}"))

    def _on_voice_onset(self, event: VoiceOnset) -> None:
        self.interruptions.voice_onset(event.time, self._responder.reply)

    def _on_speech_started(self, event: SpeechStarted) -> None:
        turn = self._speaking = self._new_turn()
        turn.ledger.mark("speech_start", event.time)
        turn.start_sample, turn.voiced_start = max(0, event.sample - self._pre_roll), event.sample
        stt = self.config.stt
        turn.transcriber = UtteranceTranscriber(
            stt=self.engines.stt, ring=self._ring, endpointer=self.endpointer, start_sample=turn.start_sample,
            owner=turn.tasks, clock=self.clock, early_final=stt.early_final,
            partial_interval_s=stt.partial_interval_ms / 1000, tail_samples=stt.tail_ms * SAMPLE_RATE // 1000,
            on_early_final=lambda _t, text: self._on_early_final(turn, text),
            on_partial=lambda text: self._emit(TranscriptEvent(turn.number, text, final=False)),
            on_stale=turn.drop_speculation,
            on_usage=lambda seconds: self.meter.charge(turn.number, {STT_AUDIO_S: seconds}))
        turn.barge_in = self.interruptions.speech_started(event.time, self._responder.reply)
        self._advance(E.SPEECH_STARTED)

    def _on_speech_paused(self, _event: SpeechPaused) -> None:
        turn = self._speaking
        if turn is not None:
            if self.end_of_turn is not None:
                self.end_of_turn.paused(self.endpointer.pauses, int16_to_float32(self._ring.slice(turn.start_sample, self._ring.end)),
                                        notes=turn.ledger.notes, owner=turn.tasks, label=f"turn {turn.number}")
            turn.stt.speech_paused()

    def _on_speech_resumed(self, _event: SpeechResumed) -> None:
        if self._speaking is not None:
            if self.end_of_turn is not None:
                self.end_of_turn.resumed()
            self._speaking.stt.speech_resumed()
            self._speaking.drop_speculation()

    def _on_early_final(self, turn: Turn, text: str) -> None:
        """The early final is done inside the silence: a text ending mid-phrase keeps the turn open; speculate."""
        if self.end_of_turn is not None and turn is self._speaking:
            self.end_of_turn.transcript(text)
        self._maybe_speculate(turn, text)

    def _on_speech_ended(self, event: SpeechEnded) -> None:
        turn, self._speaking = self._speaking, None
        if turn is None:
            return
        if self.end_of_turn is not None:
            self.end_of_turn.resumed()     # the pause's decision is history now
        ledger = turn.ledger
        ledger.mark("speech_end", event.speech_end)
        ledger.mark("endpoint", self.clock())
        if self.config.vad.speech_guard:   # tones, DTMF heard as audio, noise, music: no turn (speech_guard.py)
            started = time.perf_counter()
            verdict = speech_guard.check(self._ring.slice(turn.voiced_start, event.end_sample))
            ledger.notes.update(verdict.notes(), guard_ms=round((time.perf_counter() - started) * 1000, 1))
            if verdict.reason is not None:
                ledger.notes["non_speech"] = verdict.reason
        turn.transcription, early = turn.stt.final(event.end_sample)
        ledger.notes["early_final"] = early
        if not early:
            turn.drop_speculation(wasted=False)
        ledger.mark("stt_start", turn.transcription.started)
        self.interruptions.turn_ended(turn)
        ledger.notes["speculative"] = turn.speculation is not None
        self._responder.submit(turn)
        self._advance(E.SPEECH_ENDED, E.AGENT_AUDIBLE if self.playout.audible else None)

    def _queue_keypad_turn(self, digits: str) -> None:
        turn = self._new_turn(keypad=digits)
        now = self.clock()
        turn.ledger.mark("speech_end", now)
        turn.ledger.mark("endpoint", now)
        turn.transcription = Transcription.ready(as_text(digits), now)
        self._responder.submit(turn)
        self._advance(E.TURN_QUEUED)

    def _maybe_speculate(self, turn: Turn, text: str) -> None:
        """The early final is done while the caller is silent: start the reply, held."""
        if (not self.config.llm.speculate or self._closed or not has_words(text)
                or self._agent_active or self._responder.waiting      # one reply at a time
                or turn.barge_in is not None):
            return
        turn.speculation = self._responder.new_reply(turn.number, text.strip()).start(turn.tasks)

    # ------------------------------------------------------------ state & events
    def _advance(self, *events: E | None) -> None:
        if self.turn_state.fire(*events):
            self._emit(StateChanged(self.turn_state.state))

    def _emit(self, event: Event) -> None:
        if isinstance(event, TurnFinished | TurnFailed | TurnDiscarded):
            event = self._with_usage(event)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", type(event).__name__)

    def _with_usage(self, event: TurnFinished | TurnFailed | TurnDiscarded) -> TurnFinished | TurnFailed | TurnDiscarded:
        """The turn's report: its ledger's ``usage`` filled from the meter (a TurnDiscarded gets the ledger)."""
        ledger = self._ledgers.pop(event.turn, None) or event.ledger
        usage = self.meter.report_turn(event.turn)
        if ledger is None:
            ledger = TurnLedger(event.turn)
        add_usage(ledger.usage, usage)
        if isinstance(event, TurnDiscarded) and event.ledger is None:
            event = replace(event, ledger=ledger)
        return event

    @property
    def finished(self) -> list[TurnFinished]:
        """The turns answered so far."""
        return self._responder.finished

    @property
    def state(self) -> TurnState:
        return self.turn_state.state

    @property
    def speculating(self) -> bool:
        """A held reply is being prepared for the utterance in progress."""
        return self._speaking is not None and self._speaking.speculation is not None

    @property
    def barge_ins(self) -> list[tuple[float, float]]:
        """(voice onset, agent silent) of every barge-in, committed or not (clock seconds)."""
        return self.interruptions.barge_ins

    @property
    def barge_in_reactions(self) -> list[float]:
        """Seconds from the caller's voice onset to the agent's silence, per barge-in."""
        return [silent - onset for onset, silent in self.barge_ins]

    @property
    def false_interruptions(self) -> int:
        """Barge-ins that ended with the agent resuming (a cough, a backchannel)."""
        return self.interruptions.false_interruptions

    @property
    def busy(self) -> bool:
        """A turn is being spoken, transcribed, answered or played."""
        responder = self._responder
        return self.endpointer.in_speech or responder.answering or responder.waiting or not self.playout.idle

    async def aclose(self) -> None:
        """End the call: cancel every task this conversation owns and wait for them, then emit what
        the call consumed since its last turn report (`CallUsage`, once)."""
        self._closed = self.interruptions.closed = True
        self.playout.flush()
        await self._farewell.aclose()
        await self._tasks.aclose()
        if self.recording is not None and not self.recording.closed:
            path = self.recording.close()
            if path is not None:
                self._emit(CallRecorded(str(path), round(self.recording.seconds, 3)))
        if not self.meter.closed:
            self._emit(CallUsage(self.meter.close()))
