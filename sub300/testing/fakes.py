"""Named fakes of the four engines, for fast tests on virtual time.

Each implements its Protocol in `sub300.models.protocols` and, beside the
blocking method, the coroutine the conversation prefers when an engine has
one (`transcribe_async`, `synthesize_async`; see `agent/transcription.py`
and `agent/reply.py`).  Their latencies are `asyncio.sleep`s, so under a
virtual clock (looptime) a turn's ledger is exactly the sum of the delays
configured here, and a test takes milliseconds.

* `FakeVad` — voiced wherever the input is not digital silence (or as a
  per-frame script says);
* `FakeStt` — a scripted transcript after ``delay_s``;
* `FakeLlm` — scripted tokens, the first after ``first_token_s``, the next
  each ``per_token_s``; its usage counts words as tokens (the fake's rule);
* `FakeTts` — ``ms_per_piece`` of a tone per piece, after ``delay_s``.
* `FakeTurnModel` — a scripted P(turn complete) after ``delay_s``.

`speech()` makes caller "speech" the fakes understand: noise (which the
echo guard cannot mistake for the agent's tone).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence

import numpy as np

from sub300.agent.engines import Engines
from sub300.models.protocols import SAMPLE_RATE, ChatMessage, LlmUsage, ModelError, Transcript
from sub300.models.scheduling import WorkTicket

FRAME = 320   # 20 ms at 16 kHz


def speech(seconds: float, *, level: int = 3000, seed: int = 0) -> np.ndarray:
    """``seconds`` of caller "speech" for `FakeVad` (int16 16 kHz): noise, never digital silence.

    Its level rises and falls in 4 "syllables" a second (between ``level`` and
    a tenth of it), as speech does: steady noise is what the non-speech guard
    (agent/speech_guard.py) rejects.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    envelope = 0.1 + 0.9 * np.abs(np.cos(np.pi * 4.0 * np.arange(n) / SAMPLE_RATE))
    pcm = np.clip(rng.normal(0, level, n) * envelope, -32767, 32767).astype(np.int16)
    pcm[pcm == 0] = 1
    return pcm


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE)), np.int16)


def tone(ms: float, sample_rate: int = SAMPLE_RATE, hz: float = 440.0, level: int = 8000) -> np.ndarray:
    """A sine of ``ms`` milliseconds, int16."""
    t = np.arange(int(round(ms * sample_rate / 1000))) / sample_rate
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.int16)


# ------------------------------------------------------------------ VAD
class _FakeVadStream:
    def __init__(self, script: Iterator[bool] | None):
        self._script = script

    def speech_probability(self, frame: np.ndarray) -> float:
        if self._script is not None:
            return 1.0 if next(self._script, False) else 0.0
        return 1.0 if np.any(frame) else 0.0


class FakeVad:
    """Voiced = any non-zero sample in the frame; or, with ``script``, one bool per frame (then unvoiced)."""

    name = "fake-vad"
    frame_samples = FRAME
    threshold = 0.5

    def __init__(self, script: Iterable[bool] | None = None):
        self._script = None if script is None else list(script)

    def new_stream(self) -> _FakeVadStream:
        return _FakeVadStream(None if self._script is None else iter(self._script))


# ------------------------------------------------------------------ STT
class FakeStt:
    """Returns ``text`` (a string, or a function of the audio) after ``delay_s``.

    ``error``: raise this `ModelError` instead, for the next ``fail_times``
    calls (then answer normally).  ``calls`` records (start time, audio seconds)
    on the loop's clock.
    """

    name = "fake-stt"
    device = "cpu/fake"

    def __init__(self, text: str | Callable[[np.ndarray], str] = "", *, delay_s: float = 0.1,
                 error: ModelError | None = None, fail_times: int = 1):
        self._text = text
        self.delay_s = delay_s
        self._error, self._fail_times = error, fail_times
        self.calls: list[tuple[float, float]] = []
        self.tickets: list[WorkTicket | None] = []

    def _answer(self, audio: np.ndarray) -> Transcript:
        if self._error is not None and self._fail_times > 0:
            self._fail_times -= 1
            raise self._error
        text = self._text(audio) if callable(self._text) else self._text
        return Transcript(text, len(audio) / SAMPLE_RATE, self.delay_s)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        time.sleep(self.delay_s)
        return self._answer(audio)

    async def transcribe_async(self, audio: np.ndarray, *, ticket: WorkTicket | None = None) -> Transcript:
        self.calls.append((asyncio.get_running_loop().time(), len(audio) / SAMPLE_RATE))
        self.tickets.append(ticket)
        if ticket is not None:
            ticket.mark_started()          # a fake has no queue
        try:
            await asyncio.sleep(self.delay_s)
            return self._answer(audio)
        finally:
            if ticket is not None:
                ticket.mark_finished()


def voiced_seconds(audio: np.ndarray) -> float:
    """Seconds of non-silent audio in a float32 clip (what a `FakeStt` text function may key on)."""
    return float(np.count_nonzero(audio)) / SAMPLE_RATE


# ------------------------------------------------------------------ LLM
class FakeLlm:
    """Streams ``tokens`` (or ``tokens(messages)``): the first after ``first_token_s``, then one per ``per_token_s``.

    ``error``: for the next ``fail_times`` calls, stream only the first
    ``error_after`` tokens and then raise this `ModelError` (a stream that
    fails mid-answer; ``error_after=0``: before the first token).
    ``requests`` records the messages of every call.

    Usage (``usage=``, `LlmUsage`): the fake's rule is one token per
    whitespace-separated word: ``prompt_tokens`` = the words of every
    message's content, ``completion_tokens`` = the words of the text
    streamed so far (``"Sure", ".", " Paris"`` is 2; updated as each token
    is yielded), ``reported_by`` = "fake".
    """

    name = "fake-llm"

    def __init__(self, tokens: Sequence[str] | Callable[[Sequence[ChatMessage]], Sequence[str]] = ("Hello there.",),
                 *, first_token_s: float = 0.05, per_token_s: float = 0.01,
                 error: ModelError | None = None, error_after: int = 0, fail_times: int = 1):
        self._tokens = tokens
        self.first_token_s, self.per_token_s = first_token_s, per_token_s
        self._error, self._error_after, self._fail_times = error, error_after, fail_times
        self.requests: list[list[ChatMessage]] = []
        self.tickets: list[WorkTicket | None] = []

    async def stream_chat(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                          temperature: float = 0.0, ticket: WorkTicket | None = None,
                          usage: LlmUsage | None = None) -> AsyncGenerator[str, None]:
        self.requests.append(list(messages))
        if usage is not None:
            usage.prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            usage.completion_tokens, usage.reported_by = 0, "fake"
        self.tickets.append(ticket)
        if ticket is not None:
            ticket.mark_started()          # a fake has no queue
        tokens = self._tokens(messages) if callable(self._tokens) else self._tokens
        error = None
        if self._error is not None and self._fail_times > 0:
            self._fail_times -= 1
            error, tokens = self._error, tokens[:self._error_after]
        streamed = ""
        for i, token in enumerate(tokens[:max_tokens]):
            await asyncio.sleep(self.first_token_s if i == 0 else self.per_token_s)
            streamed += token
            if usage is not None:
                usage.completion_tokens = len(streamed.split())
            yield token
        if error is not None:
            await asyncio.sleep(self.per_token_s)
            raise error


# ------------------------------------------------------------------ TTS
class FakeTts:
    """``ms_per_piece`` of a 440 Hz tone per piece of text, in ``chunks`` equal chunks (a streaming
    engine's, as XTTS's) each after ``delay_s``.

    ``pieces`` records the texts asked for.
    """

    name = "fake-tts"

    def __init__(self, *, delay_s: float = 0.03, ms_per_piece: float = 500.0, sample_rate: int = SAMPLE_RATE,
                 chunks: int = 1):
        self.delay_s, self.ms_per_piece, self.sample_rate = delay_s, ms_per_piece, sample_rate
        self.chunks = chunks
        self.pieces: list[str] = []
        self.tickets: list[WorkTicket | None] = []

    def _chunks(self) -> list[np.ndarray]:
        return np.array_split(tone(self.ms_per_piece, self.sample_rate), self.chunks)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        self.pieces.append(text)
        for chunk in self._chunks():
            time.sleep(self.delay_s)
            yield chunk

    async def synthesize_async(self, text: str, *, ticket: WorkTicket | None = None) -> AsyncIterator[np.ndarray]:
        self.pieces.append(text)
        self.tickets.append(ticket)
        if ticket is not None:
            ticket.mark_started()          # a fake has no queue
        for chunk in self._chunks():
            await asyncio.sleep(self.delay_s)
            yield chunk
        if ticket is not None:
            ticket.mark_finished()


# ------------------------------------------------------------------ end of turn
class FakeTurnModel:
    """A `TurnCompletionModel` whose P(complete) is ``probability`` (a number, or a function of the
    turn's audio), after ``delay_s`` of virtual time; ``error``: raise it instead.
    ``calls`` records (loop time, audio seconds) of every scoring."""

    name = "fake-turn"
    device = "cpu"

    def __init__(self, probability: float | Callable[[np.ndarray], float] = 0.9, *, delay_s: float = 0.03,
                 error: Exception | None = None):
        self._probability, self.delay_s, self.error = probability, delay_s, error
        self.calls: list[tuple[float, float]] = []

    def probability(self, audio: np.ndarray) -> float:
        if self.error is not None:
            raise self.error
        return self._probability(audio) if callable(self._probability) else self._probability

    async def probability_async(self, audio: np.ndarray) -> float:
        self.calls.append((asyncio.get_running_loop().time(), len(audio) / SAMPLE_RATE))
        await asyncio.sleep(self.delay_s)
        return self.probability(audio)


def fake_engines(*, vad: FakeVad | None = None, stt: FakeStt | None = None, llm: FakeLlm | None = None,
                 tts: FakeTts | None = None, turn: FakeTurnModel | None = None) -> Engines:
    """An `Engines` bundle of fakes (defaults for the ones not given; no turn model unless given)."""
    return Engines(vad=vad or FakeVad(), stt=stt or FakeStt("Hello."), llm=llm or FakeLlm(), tts=tts or FakeTts(),
                   turn=turn)
