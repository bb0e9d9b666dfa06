"""One turn's answer: LLM tokens → sentence/clause pieces → TTS → playout.

The LLM and TTS run as two tasks joined by a queue, so the first piece is
spoken while the rest is still being generated.  A reply can start *held*
(speculatively, on the early transcript, while the caller might still go
on): its audio is kept back until `commit()`, or thrown away by `cancel()`.
Its marks go to a scratch ledger until commit, so a wasted speculation
leaves no trace in the turn's ledger.

The Reply's task belongs to the `TaskOwner` given to `start()` (the turn's);
the conversation awaits or cancels it.

When the LLM fails (any `ModelError`: a dropped stream, an error event, an
HTTP error, a timeout) or finishes without a word to say (`EmptyReply`), the
reply does not raise: it keeps the failure in ``error``, lets TTS finish the
complete pieces already generated (an unfinished sentence is dropped), then
speaks ``settings.fallback_text`` (empty: nothing) and ends normally, so the
caller hears "…, sorry, I can't answer that right now" instead of half a
sentence and dead air; the responder reports the turn as failed.  A TTS
failure still raises (there is no voice left to say the fallback with), as
the original typed error: the two stages run in an `asyncio.TaskGroup` whose
single-exception group is unwrapped (`_unwrap`).

Usage (agent/usage.py), given to ``charge`` as the work is done: the LLM's
prompt and completion tokens once its stream has ended or was closed (the
engine's `LlmUsage`; a reply cancelled mid-answer, a wasted speculation
included, is billed for the tokens it did generate: work done is billed), and
the characters of every piece's spoken form as it is sent to TTS (the
fallback line included).  An engine that cannot count (no ``usage`` keyword,
or an endpoint that sends none) is logged once and adds no tokens.

Tools (agent/tools.py): with ``tools``, the LLM (a `ToolCallingModel`) gets their schemas; when it
asks for calls, the text it said first is flushed to TTS, the calls run concurrently (`run_tool`:
each with its timeout, ``settings.tool_timeout_s`` unless the tool sets one; errors, timeouts and
invalid arguments become the result's text, which the model can say out loud), then the model is
asked again with its ``tool_calls`` message and the ``tool`` results, at most
``settings.max_tool_rounds`` rounds (a model that asks again fails the turn with kind
``tool_rounds``: the fallback line).  Tools run only once the reply is committed: a speculation never
calls one (a tool may act on the world; a speculation may be thrown away).  Their tasks belong to
the reply's own task (a TaskGroup): a barge-in or a hang-up cancels the reply, which cancels and
awaits them (a plain function in a worker thread cannot be stopped: its result is dropped).  When
the tools run longer than ``settings.tool_filler_ms`` and nothing of the reply was queued yet,
``settings.tool_filler_text`` ("One moment.") is spoken as the reply's first piece, through TTS as
any piece: it is the first audio (voice-to-voice measures it, the ledger notes ``filler``) and the
history keeps it, as the caller heard it.  Ledger: marks ``tool_start`` / ``tool_end`` (the stages
``llm_tool_call`` and ``tool``), notes ``tool_calls``, ``tool_rounds``, ``tool_ms`` (the calls'
summed time); each call is a `ToolCalled` event; ``tool_messages`` keeps the exchange of the rounds
that completed, for the history.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sub300.models.protocols import (
    ChatMessage,
    EmptyReply,
    LanguageModel,
    LlmUsage,
    ModelError,
    SpeechSynthesizer,
    ToolCall,
    accepts_usage,
)
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.threads import iterate_in_thread

from .audio import StreamResampler
from .events import AgentSpeech, EventHandler, ToolCalled
from .ledger import TurnLedger
from .playout import PlayoutQueue
from .sentences import SentenceSplitter
from .spoken_form import spoken_form
from .tasks import TaskOwner
from .tools import Tool, ToolResult, run_tool
from .usage import LLM_COMPLETION_TOKENS, LLM_PROMPT_TOKENS, TTS_CHARS
from .words import has_words

Clock = Callable[[], float]
log = logging.getLogger(__name__)

#: how often a committed reply looks at its playout slack (seconds)
SLACK_POLL_S = 0.05
#: silence kept at the end of a piece cut inside a sentence (ms): Piper ends every piece as an utterance
#: with 150-220 ms of silence, a pause where the sentence goes on (scripts/bench_first_piece.py, seam)
SEAM_KEEP_MS = 30
#: a 10 ms block this far under the piece's loudest is silence (dB)
SEAM_SILENCE_DB = 40.0
#: of a piece cut inside a sentence, the audio held back until the next chunk or the piece's end (ms):
#: longer than the silence TTS ends a piece with (Piper 150-220 ms), so that it can be trimmed, and no
#: more, so a streaming engine's chunk (XTTS) goes on at once but for this tail (`SeamHold`)
SEAM_HOLD_MS = 400
#: silence kept before the first sound of a reply (ms): Piper starts every piece with 20-40 ms under
#: -55 dBFS, which the caller waits through (the ledger's transport part `quiet_lead`, issue 11)
LEAD_KEEP_MS = 5


@dataclass
class ReplySettings:
    max_tokens: int
    temperature: float
    min_clause_chars: int
    first_piece_max_words: int = 0
    #: spoken after a failed or empty LLM answer ("" = nothing)
    fallback_text: str = ""
    #: tools: a call's limit (s) when the tool sets none (llm.tool_timeout_s)
    tool_timeout_s: float = 5.0
    #: tools: rounds of calls in one reply at most (llm.max_tool_rounds)
    max_tool_rounds: int = 3
    #: tools: the filler is spoken once tools have run this long (ms) with nothing said (llm.tool_filler_ms)
    tool_filler_ms: float = 700.0
    #: tools: the filler ("" = none) (llm.tool_filler_text)
    tool_filler_text: str = "One moment."


class ToolRoundsExceeded(ModelError):
    """The model asked for tools again after ``max_tool_rounds`` rounds of them."""

    kind = "tool_rounds"


#: characters of a tool's result a `ToolCalled` event carries
EVENT_RESULT_CHARS = 200


class Reply:
    def __init__(
        self,
        *,
        turn: int,
        messages: Sequence[ChatMessage],
        llm: LanguageModel,
        tts: SpeechSynthesizer,
        playout: PlayoutQueue,
        clock: Clock,
        emit: EventHandler,
        settings: ReplySettings,
        on_first_audio_out: Callable[[float], None] | None = None,
        charge: Callable[[Mapping[str, float]], None] | None = None,
        tools: Mapping[str, Tool] | None = None,
    ):
        """``charge(usage)``: where the reply's usage goes as it is done (the call's meter, for this
        turn: agent/metering.py); None: not counted.  ``tools``: by name, the functions the model may
        call (the LLM must be a `ToolCallingModel`: agent/tools.py `check_tools`); None or empty: none."""
        self.turn = turn
        self.messages = list(messages)
        self.pieces: list[str] = []
        self.ledger = TurnLedger(turn)          # scratch until commit
        self.committed = False
        # Deadline classes (models/scheduling.py): speculative until commit; the LLM's first
        # tokens and the first piece's TTS are committed; the rest has the playout's slack.
        self._llm_ticket = WorkTicket(Urgency.SPECULATIVE, clock=clock, label=f"turn{turn}-llm")
        self._first_tts_ticket = WorkTicket(Urgency.SPECULATIVE, clock=clock, label=f"turn{turn}-tts")
        self._tts_ticket: WorkTicket | None = None      # the piece being synthesized
        self.interrupted = False
        self._llm, self._tts, self._playout = llm, tts, playout
        self._clock, self._emit, self._settings = clock, emit, settings
        self._on_first_audio_out = on_first_audio_out
        self._charge = charge
        #: the LLM request's token counts (None: the engine takes no ``usage`` keyword)
        self.llm_usage: LlmUsage | None = None
        self._held: list[tuple[np.ndarray, int]] = []   # audio made before commit: (pcm, piece)
        self._first_pushed = False
        self._first_audio = asyncio.Event()   # TTS made the first audio (or gave up)
        self.task: asyncio.Task | None = None
        #: the LLM's failure (an EmptyReply when it said nothing); None when it answered
        self.error: ModelError | None = None
        #: index in ``pieces`` of the fallback line, once queued
        self.fallback_piece: int | None = None
        #: index in ``pieces`` of the tools' filler line, once queued
        self.filler_piece: int | None = None
        self._tools = dict(tools or {})
        self._committed = asyncio.Event()     # tools wait for it: a speculation calls none
        #: the assistant ``tool_calls`` and ``tool`` messages of the rounds that completed (for the history)
        self.tool_messages: list[ChatMessage] = []

    # ------------------------------------------------------------ control
    def start(self, owner: TaskOwner) -> Reply:
        """Start generating as a task of ``owner``."""
        self.task = owner.spawn(self._run(), name=f"turn{self.turn}-reply")
        return self

    def commit(self, ledger: TurnLedger) -> None:
        """The turn is real: adopt the turn's ledger and release held audio."""
        for name, at in self.ledger.marks.items():
            ledger.mark(name, at)
        for name, value in self.ledger.notes.items():   # "failed", "unspoken" of a speculation that failed
            ledger.notes.setdefault(name, value)
        for stage, ms in self.ledger.queue_ms.items():
            ledger.queue_ms.setdefault(stage, ms)
        for stage, ms in self.ledger.work_ms.items():
            ledger.work_ms.setdefault(stage, ms)
        for stage, ms in self.ledger.network_ms.items():
            ledger.network_ms.setdefault(stage, ms)
        self.ledger = ledger
        self.committed = True
        self._committed.set()
        self._llm_ticket.urgency = Urgency.SLACK if ledger.has("first_piece") else Urgency.COMMITTED
        self._first_tts_ticket.urgency = Urgency.COMMITTED
        for text in self.pieces:
            self._emit(AgentSpeech(self.turn, text))
        held, self._held = self._held, []
        for pcm, index in held:
            self._push(pcm, index)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def heard_text(self) -> str:
        """What the caller actually heard: whole pieces played, and the played share of the one cut."""
        heard: list[str] = []
        for index, piece in enumerate(self.pieces):
            fraction = self._playout.played_fraction(self.turn, index)
            if fraction >= 0.999:
                heard.append(piece)
                continue
            words = piece.split()
            cut = int(len(words) * fraction)
            if cut:
                heard.append(" ".join(words[:cut]))
            break
        return " ".join(heard)

    @property
    def text(self) -> str:
        return " ".join(self.pieces)

    # ------------------------------------------------------------ work
    def _push(self, pcm: np.ndarray, piece: int) -> None:
        if not self.committed:
            self._held.append((pcm, piece))
            return
        first = not self._first_pushed and len(pcm) > 0
        self._first_pushed = self._first_pushed or first
        self._playout.push(pcm, turn=self.turn, piece=piece, on_first_out=self._first_out if first else None)

    def _first_out(self, at: float) -> None:
        self.ledger.mark("first_audio_out", at)
        if self._on_first_audio_out is not None:
            self._on_first_audio_out(at)

    async def _run(self) -> None:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._generate(queue), name=f"turn{self.turn}-llm")
                synthesis = group.create_task(self._synthesize(queue), name=f"turn{self.turn}-tts")
                group.create_task(self._watch_slack(synthesis), name=f"turn{self.turn}-slack")
        except BaseExceptionGroup as group_error:
            raise _unwrap(group_error) from None

    async def _generate(self, queue: asyncio.Queue[str | None]) -> None:
        settings = self._settings
        splitter = SentenceSplitter(settings.min_clause_chars, settings.first_piece_max_words)
        self.ledger.mark("llm_start", self._clock())
        queued: list[str] = []
        messages = list(self.messages)
        rounds = 0
        try:
            while True:
                calls, said = await self._llm_round(messages, splitter, queue, queued)
                if not calls:
                    break
                if rounds >= settings.max_tool_rounds:
                    raise ToolRoundsExceeded(
                        f"LLM {_endpoint_of(self._llm)}: asked for tools again after {rounds} rounds of tool calls "
                        f"(llm.max_tool_rounds = {settings.max_tool_rounds})")
                rounds += 1
                for piece in splitter.flush():     # what it said before the calls is complete: say it now
                    self._queue_piece(piece, queue, queued)
                results = await self._call_tools(calls, queue, queued)
                exchange: list[ChatMessage] = [
                    {"role": "assistant", "content": said or None,
                     "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                                  "arguments": c.arguments}}
                                    for c in calls]},
                    *(result.message() for result in results)]
                messages.extend(exchange)
                self.tool_messages.extend(exchange)
                self.ledger.notes["tool_rounds"] = rounds
                self._llm_ticket = WorkTicket(Urgency.COMMITTED, clock=self._clock,
                                              label=f"turn{self.turn}-llm{rounds}")
        except ModelError as error:
            self.error = error
        except Exception as error:   # a bug in the engine: logged with its traceback, yet the caller hears the fallback
            log.exception("turn %d: LLM %s raised %s", self.turn, self._llm.name, type(error).__name__)
            self.error = ModelError(f"LLM {_endpoint_of(self._llm)}: unexpected {type(error).__name__}: {error}")
            self.error.kind = "internal"
        rest = splitter.flush()
        if self.error is not None and rest and not _SENTENCE_END.search(rest[-1]):
            # cut off mid-sentence: say the fallback rather than half a sentence
            self.ledger.notes["unspoken"] = rest.pop()
        for piece in rest:
            self._queue_piece(piece, queue, queued)
        if self.error is None and not any(has_words(piece) for i, piece in enumerate(queued) if i != self.filler_piece):
            self.error = EmptyReply(f"LLM {_endpoint_of(self._llm)}: empty answer, no text to speak "
                                    f"({len(queued)} pieces, {sum(map(len, queued))} characters)")
        self.ledger.mark("llm_done", self._clock())
        if self.error is not None:
            self.ledger.notes["failed"] = failure_note("llm", self.error)
            if settings.fallback_text.strip():
                self.fallback_piece = len(queued)
                self.ledger.mark("first_piece", self._clock())
                queue.put_nowait(settings.fallback_text.strip())
        queue.put_nowait(None)

    def _queue_piece(self, piece: str, queue: asyncio.Queue[str | None], queued: list[str]) -> None:
        self._first_piece_made()
        queued.append(piece)
        queue.put_nowait(piece)

    async def _llm_round(self, messages: Sequence[ChatMessage], splitter: SentenceSplitter,
                         queue: asyncio.Queue[str | None], queued: list[str]) -> tuple[list[ToolCall], str]:
        """One request to the LLM: its text goes to ``queue`` piece by piece; returns the tool calls it
        asked for (none: its answer is complete) and the text it said in this round.  Raises ModelError."""
        settings = self._settings
        stream: AsyncGenerator[str | ToolCall, None] | None = None
        self.llm_usage = _usage_for(self._llm)
        kwargs: dict[str, Any] = {} if self.llm_usage is None else {"usage": self.llm_usage}
        if self._tools:
            kwargs["tools"] = [tool.schema() for tool in self._tools.values()]
        ended = False       # the stream ran to its end (an engine that counts has given its usage then)
        calls: list[ToolCall] = []
        said: list[str] = []
        try:
            stream = self._llm.stream_chat(messages, max_tokens=settings.max_tokens,
                                           temperature=settings.temperature, ticket=self._llm_ticket, **kwargs)
            async for text in stream:
                if isinstance(text, ToolCall):
                    calls.append(text)
                    continue
                said.append(text)
                if text and not self.ledger.has("llm_first_token"):
                    now = self._clock()
                    self.ledger.mark("llm_first_token", now)
                    self.ledger.record_engine("llm", self._llm_ticket, work_end=now)
                for piece in splitter.push(text):
                    self._queue_piece(piece, queue, queued)
                if queue.qsize() and not self._first_audio.is_set():
                    # The caller is waiting for the first piece's audio: leave the CPU
                    # to TTS (an engine with flow control pauses meanwhile).
                    await self._first_audio.wait()
            ended = True
        finally:
            try:
                if stream is not None:
                    await stream.aclose()
            finally:
                self._charge_llm(ended)
        return calls, "".join(said)

    async def _call_tools(self, calls: Sequence[ToolCall], queue: asyncio.Queue[str | None],
                          queued: list[str]) -> list[ToolResult]:
        """Run ``calls`` concurrently (once the reply is committed), the filler queued if they run
        longer than ``tool_filler_ms`` with nothing said yet; their results in the calls' order."""
        await self._committed.wait()
        settings = self._settings
        self.ledger.mark("tool_start", self._clock())
        try:
            async with asyncio.TaskGroup() as group:   # cancelling the reply cancels and awaits every call
                tasks = [group.create_task(self._call_tool(call), name=f"turn{self.turn}-tool-{call.name}")
                         for call in calls]
                filler = settings.tool_filler_text.strip()
                if filler and not queued and "filler" not in self.ledger.notes:
                    _done, running = await asyncio.wait(tasks, timeout=settings.tool_filler_ms / 1000.0)
                    if running:
                        self.ledger.notes["filler"] = filler
                        self.filler_piece = len(queued)
                        log.info("turn %d: tools still running after %g ms: the filler %r is said",
                                 self.turn, settings.tool_filler_ms, filler)
                        self._queue_piece(filler, queue, queued)
        except BaseExceptionGroup as group_error:   # a call never raises (run_tool): a bug, as its own error
            raise _unwrap(group_error) from None
        self.ledger.mark_last("tool_end", self._clock())
        results = [task.result() for task in tasks]
        notes = self.ledger.notes
        notes["tool_calls"] = notes.get("tool_calls", 0) + len(results)
        notes["tool_ms"] = round(notes.get("tool_ms", 0.0) + sum(r.duration_s for r in results) * 1000.0, 1)
        return results

    async def _call_tool(self, call: ToolCall) -> ToolResult:
        """One call (never raises but for its cancellation), reported as a `ToolCalled` event."""
        started = self._clock()
        try:
            result = await run_tool(self._tools, call, default_timeout_s=self._settings.tool_timeout_s,
                                    clock=self._clock)
        except asyncio.CancelledError:
            log.info("turn %d: tool %s cancelled after %.0f ms", self.turn, call.name,
                     (self._clock() - started) * 1000.0)
            self._emit(ToolCalled(self.turn, call.name, call.arguments,
                                  round((self._clock() - started) * 1000.0, 1), "cancelled"))
            raise
        self._emit(ToolCalled(self.turn, call.name, call.arguments, round(result.duration_s * 1000.0, 1),
                              result.outcome, result.content[:EVENT_RESULT_CHARS]))
        return result

    def _charge_llm(self, ended: bool) -> None:
        """The request's tokens (once: the stream is closed), whether it finished, failed or was cancelled."""
        usage = self.llm_usage
        if self._charge is None or usage is None:
            return
        if not usage.known:
            if not ended:   # an endpoint's usage comes at the end of its stream: a cut one has none
                log.info("turn %d: the LLM request stopped before %s reported its usage: its tokens are not "
                         "counted", self.turn, self._llm.name)
            return      # ended: the engine said so when it found out (models/llm_openai.py logs it once)
        self._charge({LLM_PROMPT_TOKENS: usage.prompt_tokens or 0, LLM_COMPLETION_TOKENS: usage.completion_tokens or 0})

    def _first_piece_made(self) -> None:
        """A piece is complete: the rest of the LLM's answer has the playout's slack from now on."""
        self.ledger.mark("first_piece", self._clock())
        if self.committed:
            self._llm_ticket.urgency = Urgency.SLACK

    async def _watch_slack(self, synthesis: asyncio.Task[None]) -> None:
        """Until the reply is synthesized, keep the deadline of the work on what comes next: the moment
        the queued audio runs out (earliest deadline first among SLACK work, models/scheduling.py).

        The work stays SLACK even when the audio has run out (the caller hears a gap, counted in the
        ledger note ``gaps``).  Promoting it to COMMITTED made it compete with other calls' first
        tokens: at once, voice-to-voice p95 at 8 calls went from 2.6 s to 5.9 s; after a 1 s gap,
        a first token waited 7.3 s at 4 calls (bench_load, this project's CPU).  What keeps slack
        work from starving is the LLM's duty cycle (models/llm_batching.py) and admission.
        """
        gap = False
        while not synthesis.done():
            await asyncio.wait({synthesis}, timeout=SLACK_POLL_S)
            if not self.committed or not self._first_pushed or self._playout.paused:
                continue
            queued_s = self._playout.queued_samples / self._playout.sample_rate
            generating = None if self.ledger.has("llm_done") else self._llm_ticket
            waiting = [t for t in (generating, self._tts_ticket) if t is not None]
            for ticket in waiting:
                ticket.deadline = self._clock() + queued_s
            if waiting and queued_s == 0 and not gap:
                self.ledger.notes["gaps"] = self.ledger.notes.get("gaps", 0) + 1
            gap = bool(waiting) and queued_s == 0

    async def _synthesize(self, queue: asyncio.Queue[str | None]) -> None:
        resampler = StreamResampler(self._tts.sample_rate, self._playout.sample_rate)
        index = -1
        while (piece := await queue.get()) is not None:
            index += 1
            self.pieces.append(piece)
            if self.committed:
                self._emit(AgentSpeech(self.turn, piece))
            self.ledger.mark("tts_start", self._clock())
            ticket = self._first_tts_ticket if index == 0 else WorkTicket(
                Urgency.SLACK, clock=self._clock, label=f"turn{self.turn}-tts{index}")
            words = spoken_form(piece)          # history keeps `piece`; TTS gets the words
            if self._charge is not None:
                self._charge({TTS_CHARS: len(words)})
            chunks = _tts_chunks(self._tts, words, ticket)
            self._tts_ticket = ticket
            # a piece cut inside a sentence: the end of its audio is held until the piece ends, to trim its silence
            seam = None if _PAUSE_END.search(piece) else SeamHold(self._tts.sample_rate)
            # the reply's first chunk: its leading silence goes (the caller waits through it).  Not later
            # pieces': trimming those made the echo guard (agent/echo.py) miss the echo of a piece's start
            # on a phone line (tests/test_sip_echo.py after another call had run); not understood yet
            leading = index == 0
            made = 0   # samples synthesized for this piece (the TTS real-time factor's audio)
            try:
                async for chunk in chunks:
                    made += len(chunk)
                    if leading:
                        chunk, leading = trim_leading_silence(chunk, self._tts.sample_rate), False
                    if index == 0 and not self.ledger.has("tts_first_audio"):
                        self.ledger.record_engine("tts", ticket, work_end=self._clock())
                    self.ledger.mark("tts_first_audio", self._clock())
                    if seam is not None and not len(chunk := seam.add(chunk)):
                        continue
                    self._push(resampler.process(chunk), index)
                    self._first_audio.set()
                if seam is not None:
                    self._push(resampler.process(seam.end()), index)
                    self._first_audio.set()
                if ticket.work_s is not None and made:   # the reply's synthesis: the TTS real-time factor
                    notes = self.ledger.notes
                    notes["tts_synthesis_ms"] = round(notes.get("tts_synthesis_ms", 0.0) + ticket.work_s * 1000.0, 1)
                    notes["tts_audio_s"] = round(notes.get("tts_audio_s", 0.0) + made / self._tts.sample_rate, 3)
            finally:
                self._tts_ticket = None
                self._first_audio.set()
                await chunks.aclose()
        if index >= 0:
            self._push(resampler.flush(), index)


#: engines already said to count no tokens (one warning each)
_UNCOUNTED: set[str] = set()


def _usage_for(llm: LanguageModel) -> LlmUsage | None:
    """A fresh `LlmUsage` for ``llm``'s next request, or None (logged once per engine) when its
    ``stream_chat`` takes no ``usage`` keyword."""
    if accepts_usage(llm):
        return LlmUsage()
    if llm.name not in _UNCOUNTED:
        _UNCOUNTED.add(llm.name)
        log.warning("LLM %s counts no tokens (its stream_chat takes no usage=): its tokens are not in the usage",
                    llm.name)
    return None


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The one error a TaskGroup of this module failed with, as its own typed exception.

    A group holds more than one only if both stages failed at once: the first
    is raised and the others are attached as notes (nothing is silently lost).
    """
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    first = leaves[0]
    for other in leaves[1:]:
        first.add_note(f"also failed at the same time: {type(other).__name__}: {other}")
    return first


def _endpoint_of(llm: LanguageModel) -> str:
    """What to call an engine in a message: ``endpoint URL`` if it has one, else its name."""
    url = getattr(llm, "url", None)
    return f"endpoint {url}" if url else llm.name


def failure_note(stage: str, error: ModelError) -> str:
    """The ledger's ``failed`` note, e.g. ``llm: dropped: LLM endpoint …: connection dropped after 6 pieces …``."""
    return f"{stage}: {error.kind}: {error}"


def _tts_chunks(tts: SpeechSynthesizer, text: str,
                ticket: WorkTicket | None = None) -> AsyncGenerator[np.ndarray, None]:
    """TTS audio chunks without blocking the event loop: an engine's own ``synthesize_async(text,
    ticket=)`` (the scheduled service of models/tts_service.py, a remote engine, a test fake on
    virtual time) if it has one, else its blocking generator in a worker thread, unscheduled.
    Without a ticket the speech is COMMITTED (a goodbye the caller waits for)."""
    ticket = ticket or WorkTicket(Urgency.COMMITTED, label="tts")
    native = getattr(tts, "synthesize_async", None)
    if native is not None:
        return native(text, ticket=ticket)
    ticket.mark_started()
    return iterate_in_thread(lambda: tts.synthesize(text), name="tts")


#: a piece that ends a sentence (closing quotes or brackets may follow the mark)
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s*$")
#: a piece that ends where a speaker pauses: a sentence or a clause
_PAUSE_END = re.compile(r"[.!?…,;:—][\"')\]]*\s*$")


def _block_levels_db(pcm: np.ndarray, sample_rate: int) -> tuple[int, np.ndarray]:
    """(block length, dB of each whole 10 ms block of ``pcm``) (int16; an empty array when shorter)."""
    block = max(1, sample_rate // 100)
    blocks = len(pcm) // block
    x = pcm[: blocks * block].astype(np.float64).reshape(blocks, block)
    return block, 10 * np.log10(np.mean(x * x, axis=1) + 1e-9)


def trim_leading_silence(pcm: np.ndarray, sample_rate: int, keep_ms: float | None = None) -> np.ndarray:
    """``pcm`` (int16) from ``keep_ms`` before its first 10 ms block within `SEAM_SILENCE_DB` of its loudest.

    A piece's first chunk: TTS starts every piece with 20-40 ms of near-silence (Piper, measured as
    the ledger's `quiet_lead`), which delays the first sound the caller hears by as much.  A chunk
    with no block at all is returned whole.  ``keep_ms`` None: `LEAD_KEEP_MS` as it is at the call
    (a benchmark variant may change it)."""
    keep_ms = LEAD_KEEP_MS if keep_ms is None else keep_ms
    block, level = _block_levels_db(pcm, sample_rate)
    if len(level) == 0:
        return pcm
    voiced = np.flatnonzero(level >= level.max() - SEAM_SILENCE_DB)
    start = max(0, int(voiced[0]) * block - int(keep_ms * sample_rate / 1000))
    return pcm[start:]


def trim_trailing_silence(pcm: np.ndarray, sample_rate: int, keep_ms: float | None = None, *,
                          loudest_db: float | None = None) -> np.ndarray:
    """``pcm`` (int16) up to ``keep_ms`` after its last 10 ms block within `SEAM_SILENCE_DB` of the loudest
    (``loudest_db``, the dB of a 10 ms block as `_block_levels_db` gives it; None: ``pcm``'s own loudest).

    For a piece cut inside a sentence: TTS ends every piece as an utterance, with 150-220 ms of
    silence (Piper, measured by scripts/bench_first_piece.py); the next piece goes on the sentence."""
    keep_ms = SEAM_KEEP_MS if keep_ms is None else keep_ms
    block, level = _block_levels_db(pcm, sample_rate)
    if len(level) == 0:
        return pcm
    voiced = np.flatnonzero(level >= (level.max() if loudest_db is None else loudest_db) - SEAM_SILENCE_DB)
    last = int(voiced[-1]) + 1 if len(voiced) else 0
    return pcm[: last * block + int(keep_ms * sample_rate / 1000)]


class SeamHold:
    """The audio of a piece cut inside a sentence, chunk by chunk: `add` gives what may be played now,
    all but the last `SEAM_HOLD_MS`; `end` gives the held rest with the piece's trailing silence
    trimmed against the loudest 10 ms of the whole piece.  Piper makes one chunk a piece; a streaming
    engine (XTTS) several, and holding whole chunks kept its first one back until its second was made."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.hold = int(SEAM_HOLD_MS * sample_rate / 1000)
        self.block = max(1, sample_rate // 100)   # `_block_levels_db`'s
        self.held = np.zeros(0, np.int16)
        self.given = 0                            # samples of the piece given so far
        self.loudest_db = -np.inf

    def add(self, chunk: np.ndarray) -> np.ndarray:
        _block, level = _block_levels_db(chunk, self.sample_rate)
        if len(level):
            self.loudest_db = max(self.loudest_db, float(level.max()))
        pending = np.concatenate([self.held, chunk]) if len(self.held) else chunk
        cut = len(pending) - self.hold
        cut = max(0, cut - (self.given + cut) % self.block)   # the held part starts on the piece's 10 ms grid,
        self.given += cut                                      # so `end` trims it as the whole piece would be
        self.held = pending[cut:]
        return pending[:cut]

    def end(self) -> np.ndarray:
        loudest = None if self.loudest_db == -np.inf else self.loudest_db
        return trim_trailing_silence(self.held, self.sample_rate, loudest_db=loudest)

