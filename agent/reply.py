"""One turn's answer: LLM tokens → sentence/clause pieces → TTS → playout.

The LLM and TTS run as two tasks joined by a queue, so the first piece is
spoken while the rest is still being generated.  A reply can start *held*
(speculatively, on the early transcript, while the caller might still go
on): its audio is kept back until `commit()`, or thrown away by `cancel()`.
Its marks go to a scratch ledger until commit, so a wasted speculation
leaves no trace in the turn's ledger.

The Reply's task belongs to the `TaskOwner` given to `start()` (the turn's);
the conversation awaits or cancels it.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sub300.models.protocols import ChatMessage, LanguageModel, SpeechSynthesizer
from sub300.models.threads import iterate_in_thread

from .audio import StreamResampler
from .events import AgentSpeech, EventHandler
from .ledger import TurnLedger
from .playout import PlayoutQueue
from .sentences import SentenceSplitter
from .tasks import TaskOwner

Clock = Callable[[], float]
log = logging.getLogger(__name__)


@dataclass
class ReplySettings:
    max_tokens: int
    temperature: float
    min_clause_chars: int
    first_piece_max_words: int = 0


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
    ):
        self.turn = turn
        self.messages = list(messages)
        self.pieces: list[str] = []
        self.ledger = TurnLedger(turn)          # scratch until commit
        self.committed = False
        self.interrupted = False
        self._llm, self._tts, self._playout = llm, tts, playout
        self._clock, self._emit, self._settings = clock, emit, settings
        self._on_first_audio_out = on_first_audio_out
        self._held: list[tuple[np.ndarray, int]] = []   # audio made before commit: (pcm, piece)
        self._first_pushed = False
        self._first_audio = asyncio.Event()   # TTS made the first audio (or gave up)
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------ control
    def start(self, owner: TaskOwner) -> Reply:
        """Start generating as a task of ``owner``."""
        self.task = owner.spawn(self._run(), name=f"turn{self.turn}-reply")
        return self

    def commit(self, ledger: TurnLedger) -> None:
        """The turn is real: adopt the turn's ledger and release held audio."""
        for name, at in self.ledger.marks.items():
            ledger.mark(name, at)
        self.ledger = ledger
        self.committed = True
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
        async with asyncio.TaskGroup() as group:
            group.create_task(self._generate(queue), name=f"turn{self.turn}-llm")
            group.create_task(self._synthesize(queue), name=f"turn{self.turn}-tts")

    async def _generate(self, queue: asyncio.Queue[str | None]) -> None:
        settings = self._settings
        splitter = SentenceSplitter(settings.min_clause_chars, settings.first_piece_max_words)
        self.ledger.mark("llm_start", self._clock())
        stream = self._llm.stream_chat(self.messages, max_tokens=settings.max_tokens,
                                       temperature=settings.temperature)
        try:
            async for text in stream:
                if text and not self.ledger.has("llm_first_token"):
                    self.ledger.mark("llm_first_token", self._clock())
                for piece in splitter.push(text):
                    self.ledger.mark("first_piece", self._clock())
                    queue.put_nowait(piece)
                if queue.qsize() and not self._first_audio.is_set():
                    # The caller is waiting for the first piece's audio: leave the CPU
                    # to TTS (an engine with flow control pauses meanwhile).
                    await self._first_audio.wait()
        finally:
            await stream.aclose()
        for piece in splitter.flush():
            self.ledger.mark("first_piece", self._clock())
            queue.put_nowait(piece)
        self.ledger.mark("llm_done", self._clock())
        queue.put_nowait(None)

    async def _synthesize(self, queue: asyncio.Queue[str | None]) -> None:
        resampler = StreamResampler(self._tts.sample_rate, self._playout.sample_rate)
        index = -1
        while (piece := await queue.get()) is not None:
            index += 1
            self.pieces.append(piece)
            if self.committed:
                self._emit(AgentSpeech(self.turn, piece))
            self.ledger.mark("tts_start", self._clock())
            chunks = _tts_chunks(self._tts, _speakable(piece))
            try:
                async for chunk in chunks:
                    self.ledger.mark("tts_first_audio", self._clock())
                    self._push(resampler.process(chunk), index)
                    self._first_audio.set()
            finally:
                self._first_audio.set()
                await chunks.aclose()
        if index >= 0:
            self._push(resampler.flush(), index)


def _tts_chunks(tts: SpeechSynthesizer, text: str) -> AsyncGenerator[np.ndarray, None]:
    """TTS audio chunks without blocking the event loop: an engine's own ``synthesize_async(text)``
    (a remote engine, or a test fake on virtual time) if it has one, else its blocking
    generator in a worker thread."""
    native = getattr(tts, "synthesize_async", None)
    if native is not None:
        return native(text)
    return iterate_in_thread(lambda: tts.synthesize(text), name="tts")


_SPEAKABLE = re.compile(r"°C|°F|°")


def _speakable(text: str) -> str:
    """Small fixes for symbols TTS voices read badly."""
    return _SPEAKABLE.sub(lambda m: {"°C": " degrees Celsius", "°F": " degrees Fahrenheit", "°": " degrees"}[m.group()], text)
