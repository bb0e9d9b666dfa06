"""One turn's answer: LLM tokens → sentence/clause pieces → TTS → playout.

The LLM and TTS run as two tasks joined by a queue, so the first piece is
spoken while the rest is still being generated.  Both belong to a TaskGroup:
cancelling the reply (hang-up, barge-in) cancels both, and an engine failure
in one cancels the other.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Sequence

from models.protocols import ChatMessage, LanguageModel, SpeechSynthesizer

from .audio import StreamResampler
from .events import AgentSpeech, EventHandler
from .ledger import TurnLedger
from .playout import PlayoutQueue
from .sentences import SentenceSplitter
from .threads import iterate_in_thread

Clock = Callable[[], float]


@dataclass
class ReplyResult:
    #: every piece of text handed to TTS, in order
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.pieces)


async def speak_reply(
    *,
    turn: int,
    messages: Sequence[ChatMessage],
    llm: LanguageModel,
    tts: SpeechSynthesizer,
    playout: PlayoutQueue,
    ledger: TurnLedger,
    clock: Clock,
    emit: EventHandler,
    max_tokens: int,
    temperature: float,
    min_clause_chars: int,
    on_first_audio_out: Callable[[float], None] | None = None,
) -> ReplyResult:
    result = ReplyResult()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    async def generate() -> None:
        splitter = SentenceSplitter(min_clause_chars)
        ledger.mark("llm_start", clock())
        stream = llm.stream_chat(messages, max_tokens=max_tokens, temperature=temperature)
        try:
            async for text in stream:
                if text and not ledger.has("llm_first_token"):
                    ledger.mark("llm_first_token", clock())
                for piece in splitter.push(text):
                    ledger.mark("first_sentence", clock())
                    pieces.put_nowait(piece)
        finally:
            await stream.aclose()
        for piece in splitter.flush():
            ledger.mark("first_sentence", clock())
            pieces.put_nowait(piece)
        ledger.mark("llm_done", clock())
        pieces.put_nowait(None)

    def first_out(at: float) -> None:
        ledger.mark("first_audio_out", at)
        if on_first_audio_out is not None:
            on_first_audio_out(at)

    async def synthesize() -> None:
        resampler = StreamResampler(tts.sample_rate, playout.sample_rate)
        first = True
        while (piece := await pieces.get()) is not None:
            result.pieces.append(piece)
            emit(AgentSpeech(turn, piece))
            ledger.mark("tts_start", clock())
            chunks = iterate_in_thread(lambda text=piece: tts.synthesize(text))
            try:
                async for chunk in chunks:
                    ledger.mark("tts_first_audio", clock())
                    pcm = resampler.process(chunk)
                    playout.push(pcm, turn=turn, on_first_out=first_out if first else None)
                    first = first and len(pcm) == 0
            finally:
                await chunks.aclose()
        playout.push(resampler.flush(), turn=turn)

    async with asyncio.TaskGroup() as group:
        group.create_task(generate(), name=f"turn{turn}-llm")
        group.create_task(synthesize(), name=f"turn{turn}-tts")
    return result
