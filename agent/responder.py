"""The agent's side of the turn-taking: queued caller turns answered one at a time.

For each turn: await its final transcript, drop it if it holds no words (or
if it was short speech during the agent's reply that did not earn the
interruption), else commit a reply — the speculative one if the turn has
it, a new one otherwise — wait until it has played (or was cut by a
barge-in), keep what the caller heard in the history, and report the turn.
An engine failure fails that turn only (`TurnFailed`, logged in one line
without a traceback, the ledger noted ``failed``); the next one is answered
as usual.  A failed or empty LLM answer still ends in speech: the reply
speaks what it had, then the fallback line, and the history keeps what was
said (reply.py).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from sub300.models.protocols import LanguageModel, ModelError, SpeechSynthesizer

from .events import EventHandler, HangupRequested, TranscriptEvent, TurnDiscarded, TurnFailed, TurnFinished
from .history import History
from .log_format import bind_turn
from .playout import PlayoutQueue
from .reply import Reply, ReplySettings, failure_note
from .speech_guard import is_annotation
from .tasks import TaskOwner
from .tools import Tool, tools_by_name
from .turn import Turn
from .turn_state import TurnEvent as E
from .words import has_words, said_phrase

log = logging.getLogger(__name__)


class Responder:
    """Answers the turns given to `submit`, in order, in one task of ``owner``.

    Replies go through ``llm`` and ``tts`` to ``playout``; ``advance`` fires
    turn-state events; ``clock`` is the conversation's.
    """

    def __init__(self, *, owner: TaskOwner, llm: LanguageModel, tts: SpeechSynthesizer, playout: PlayoutQueue,
                 history: History, settings: ReplySettings, emit: EventHandler, advance: Callable[..., None],
                 clock: Callable[[], float], hangup_phrases: Sequence[str],
                 charge: Callable[[int, Mapping[str, float]], None] | None = None,
                 tools: Sequence[Tool] = ()):
        """``tools``: what the model may call in every reply (the agent's `Behaviour.tools`)."""
        self._tools = tools_by_name(tools)
        self._owner, self._llm, self._tts, self._settings = owner, llm, tts, settings
        self._playout, self._history = playout, history
        self._emit, self._advance, self._clock, self._hangup_phrases = emit, advance, clock, hangup_phrases
        self._charge = charge       # (turn, usage): the call's usage meter (agent/metering.py)
        self._queue: asyncio.Queue[Turn] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.answering = False              # working on a turn
        self.reply: Reply | None = None     # the reply being spoken (committed)
        self.finished: list[TurnFinished] = []
        # The system prompt opens every turn's prompt: an engine that can cache a fixed prefix's state
        # (the embedded CTranslate2 model's static prompt, models/llm_ct2.py) keeps it (a bounded set).
        pin = getattr(llm, "pin_system_prompt", None)
        if pin is not None and history.system_prompt:
            pin(history.system_prompt)

    @property
    def waiting(self) -> bool:
        """Turns are queued that the responder has not taken yet."""
        return not self._queue.empty()

    def new_reply(self, turn: int, text: str) -> Reply:
        """A reply to ``text`` after the history so far, not started yet."""
        charge = self._charge
        return Reply(turn=turn, messages=self._history.messages_for(text), llm=self._llm, tts=self._tts,
                     playout=self._playout, clock=self._clock, emit=self._emit, settings=self._settings,
                     on_first_audio_out=lambda _at: self._advance(E.AGENT_AUDIBLE),
                     charge=None if charge is None else lambda usage: charge(turn, usage), tools=self._tools)

    def submit(self, turn: Turn) -> None:
        self._queue.put_nowait(turn)
        if self._task is None or self._task.done():
            self._task = self._owner.spawn(self._run(), name="responder")

    async def _run(self) -> None:
        while True:
            turn = await self._queue.get()
            self.answering = True
            self._advance(E.ANSWER_STARTED, E.AGENT_AUDIBLE if self._playout.audible else None)
            try:
                await self._answer(turn)
            except asyncio.CancelledError:
                raise
            except ModelError as error:   # an engine outside the reply's own handling (a bare stream_chat)
                self._fail(turn, "model", error)
            except Exception as error:  # a bug in one turn must not end the call
                log.exception("turn %d crashed", turn.number)
                turn.ledger.notes["failed"] = f"internal: {error!r}"
                self._emit(TurnFailed(turn.number, f"internal error: {error!r}", "internal", "crash",
                                      ledger=turn.ledger))
            finally:
                turn.tasks.cancel()     # leftovers: a partial, an unused speculation
                if self.reply is not None:
                    self.reply.cancel()
                self.reply = None
                self.answering = False
                self._advance(E.ANSWER_DONE, E.TURN_QUEUED if self.waiting else None,
                              E.AGENT_AUDIBLE if self._playout.audible else None)

    async def _answer(self, turn: Turn) -> None:
        bind_turn(turn.number)   # the responder's own task: its log lines carry the turn it answers
        ledger, transcription = turn.ledger, turn.transcription
        assert transcription is not None, "a turn is queued once it has its final transcription"
        try:
            transcript = await transcription.task
        except ModelError as stt_error:
            self._fail(turn, "stt", stt_error)
            return
        ledger.mark("stt_final", transcription.finished or self._clock())
        ledger.record_engine("stt", transcription.ticket)
        ledger.notes["stt_inference_ms"] = round(transcript.inference_seconds * 1000, 1)
        ledger.notes["stt_audio_s"] = round(transcript.audio_seconds, 2)
        if transcript.no_speech_prob is not None:
            ledger.notes["stt_no_speech_prob"] = round(transcript.no_speech_prob, 3)
        text = transcript.text.strip()
        self._emit(TranscriptEvent(turn.number, text, final=True))
        if (non_speech := ledger.notes.get("non_speech")) is not None or is_annotation(text):
            reason = f"not speech: {non_speech or f'only non-speech marks {text!r}'}"
            ledger.notes["discarded"] = reason
            log.info("turn %d discarded: %s (transcript %r)", turn.number, reason, text)
            self._emit(TurnDiscarded(turn.number, reason))
            return
        if not has_words(text):
            self._emit(TurnDiscarded(turn.number, "no words in the transcript"))
            return
        if turn.barge_in is not None and not turn.barge_in.committed:
            self._emit(TurnDiscarded(turn.number, f"{text!r} while the agent spoke: not an interruption"))
            return
        reply = turn.speculation or self.new_reply(turn.number, text).start(turn.tasks)
        turn.speculation = None
        self.reply = reply
        reply.commit(ledger)
        self._advance(E.AGENT_AUDIBLE if self._playout.audible else None)
        task = reply.task
        assert task is not None, "a committed reply has started"
        await asyncio.wait({task})                 # an interruption cancels the reply, not us
        if not task.cancelled() and (error := task.exception()) is not None:
            if isinstance(error, ModelError):   # the LLM's failures are the reply's (reply.error)
                self._fail(turn, "tts", error, transcript=text)
                return
            raise error
        if not reply.interrupted:
            await self._playout.wait_idle()
        ledger.mark("last_audio_out", self._clock())
        heard = reply.heard_text() if reply.interrupted else reply.text
        ledger.notes["interrupted"] = reply.interrupted
        self._history.add(text, heard, reply.tool_messages)
        self._playout.forget_turn(turn.number)
        if reply.error is not None:
            self._fail(turn, "llm", reply.error, transcript=text, reply=heard,
                       fallback=reply.fallback_piece is not None)
        else:
            finished = TurnFinished(turn.number, text, heard, ledger)
            self.finished.append(finished)
            log.info("turn %d: %r → %r%s, voice-to-voice %.0f ms", turn.number, text, heard,
                     " (interrupted)" if reply.interrupted else "", ledger.voice_to_voice_ms or -1)
            self._emit(finished)
        if not reply.interrupted and (phrase := said_phrase(text, self._hangup_phrases)) is not None:
            self._emit(HangupRequested(turn.number, f"the caller said {phrase!r}"))

    def _fail(self, turn: Turn, stage: str, error: ModelError, *, transcript: str = "", reply: str = "",
              fallback: bool = False) -> None:
        """Report ``turn`` as failed at ``stage``: one log line (no traceback: an engine's failure
        is expected, not a bug), the ledger's ``failed`` note, a `TurnFailed` event."""
        message = str(error)
        if not message.lower().startswith(stage):     # "LLM endpoint …" names its stage already
            message = f"{stage.upper()} {message}"
        turn.ledger.notes.setdefault("failed", failure_note(stage, error))
        log.error("turn %d failed: %s%s", turn.number, message,
                  "; answered with the fallback line" if fallback else "")
        self._emit(TurnFailed(turn.number, message, stage, error.kind, transcript, reply, turn.ledger))
