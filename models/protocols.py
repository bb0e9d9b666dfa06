"""The small interfaces every engine implements.

Engines are picked by configuration (see agent/engines.py); the conversation
only ever talks to these protocols.  Blocking methods are meant to run in a
worker thread (CTranslate2 and ONNX Runtime release the GIL); async ones are
cancellable and must stop their work when cancelled.
"""
from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .scheduling import WorkTicket

#: The pipeline's internal audio format: 16 kHz mono.
SAMPLE_RATE = 16_000


class ModelError(RuntimeError):
    """An engine failed (bad model path, inference error, remote endpoint error).

    ``kind`` names the failure for logs and metric labels (a short fixed word,
    never free text); subclasses narrow it.
    """

    kind: str = "model"


class ModelUnavailable(ModelError):
    """A model or its weights cannot be found or loaded."""

    kind = "unavailable"


class EmptyReply(ModelError):
    """A language model finished without producing any text to speak."""

    kind = "empty"


class EndpointError(ModelError):
    """A remote model endpoint is unreachable, timed out or answered with an error."""

    kind = "endpoint"


class EndpointUnreachable(EndpointError):
    """The request could not be sent: connection refused, DNS, TLS."""

    kind = "unreachable"


class EndpointTimeout(EndpointError):
    """Connecting, the first token or the gap between two reads took too long."""

    kind = "timeout"


class EndpointHTTPError(EndpointError):
    """The endpoint answered with an HTTP error status; ``kind`` is ``http_4xx`` or ``http_5xx``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
        self.kind = f"http_{status // 100}xx"


class EndpointDropped(EndpointError):
    """The connection closed (or broke) before the stream said it was complete."""

    kind = "dropped"


class EndpointStreamError(EndpointError):
    """The endpoint reported an error inside the stream (an ``{"error": ...}`` event)."""

    kind = "stream_error"


class EndpointProtocolError(EndpointError):
    """The answer could not be understood: malformed SSE/JSON, a wrong content type."""

    kind = "malformed"


# --------------------------------------------------------------------- VAD
@runtime_checkable
class VadStream(Protocol):
    """Per-call VAD state (Silero keeps a recurrent state; webrtcvad none)."""

    def speech_probability(self, frame: np.ndarray) -> float:
        """`frame`: int16 mono 16 kHz, exactly `frame_samples` long. Returns 0..1."""
        ...


@runtime_checkable
class VoiceActivityDetector(Protocol):
    name: str
    #: samples per frame this detector classifies (e.g. 320 = 20 ms, 512 = 32 ms)
    frame_samples: int
    #: probability at or above which a frame counts as voiced
    threshold: float

    def new_stream(self) -> VadStream: ...


# --------------------------------------------------------------------- STT
@dataclass(frozen=True)
class Transcript:
    text: str
    #: seconds of audio that were transcribed
    audio_seconds: float
    #: wall time spent in the engine
    inference_seconds: float
    #: Whisper's probability that the window holds no speech (0..1); None when the engine has no such signal
    no_speech_prob: float | None = None
    #: mean log-probability of the decoded tokens (nats, <= 0); None when unknown
    avg_logprob: float | None = None


@runtime_checkable
class SpeechRecognizer(Protocol):
    name: str
    #: e.g. "cpu/int8" or "cuda/float16": logged at start-up and shown in reports
    device: str

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Blocking. `audio`: float32 mono 16 kHz in [-1, 1]."""
        ...


# --------------------------------------------------------------------- LLM
#: {"role": "system"|"user"|"assistant"|"tool", "content": "..."}; with tools also an assistant message
#: with ``tool_calls`` (OpenAI's shape, content None) and ``{"role": "tool", "tool_call_id", "content"}``
ChatMessage = Mapping[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """The model asks for a function call (OpenAI function calling): yielded by `stream_chat` among
    the text pieces once its streamed ``tool_calls`` deltas are complete.

    ``arguments``: the JSON text the model wrote (not parsed: it may be invalid, and the caller says so
    to the model); ``id``: the model's call id, echoed in the ``tool`` message that carries the result.
    """

    id: str
    name: str
    arguments: str


@dataclass
class LlmUsage:
    """What one LLM request consumed, filled by the engine as it goes (``usage=`` of `stream_chat`).

    ``prompt_tokens``: tokens of the prompt the model read (a prefix whose
    state is cached still counts: the request used it); ``completion_tokens``:
    tokens it generated so far (an end-of-sequence token it sampled counts,
    as vLLM and OpenAI count it); None while unknown, and for good when the
    engine cannot tell (an OpenAI-compatible endpoint that sends no usage).
    ``reported_by``: where the counts come from: ``"tokenizer"`` (the embedded
    engine's own ids), ``"endpoint"`` (the server's ``usage`` object),
    ``"fake"`` (a test engine's rule), ``"estimate"`` (never billed as exact);
    "" while nothing is known.  A consumer reads it once the stream has
    ended or was closed (the counts then cover all the work done, a closed
    request's generated tokens included).
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reported_by: str = ""

    @property
    def known(self) -> bool:
        return self.prompt_tokens is not None or self.completion_tokens is not None


def accepts_usage(model: Any) -> bool:
    """Whether ``model.stream_chat`` takes the ``usage`` keyword (engines written before it do not:
    they are called without it, and their requests' usage is unknown)."""
    try:
        params = inspect.signature(model.stream_chat).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "usage" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@runtime_checkable
class LanguageModel(Protocol):
    name: str

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        ticket: WorkTicket | None = None,
        usage: LlmUsage | None = None,
    ) -> AsyncGenerator[str, None]:
        """Yield text pieces as they are generated (an async generator: `aclose()` stops it).

        Cancelling the consumer (or `aclose()` on the iterator) must stop the
        generation promptly; failures raise ModelError/EndpointError.
        ``ticket`` (models/scheduling.py) carries the request's deadline class,
        which may change while it runs; the engine marks it started when its
        work begins (a scheduled engine: when the request enters a batch).
        ``usage``: an `LlmUsage` the engine fills with the request's token
        counts as it goes (optional: callers check `accepts_usage` first, so an
        engine without the keyword keeps working, its usage unknown).
        """
        ...


def accepts_tools(model: Any) -> bool:
    """Whether ``model.stream_chat`` takes the ``tools`` keyword (a `ToolCallingModel`): only such an
    engine is given tools; an agent with tools on another engine is a configuration error, said at start."""
    try:
        params = inspect.signature(model.stream_chat).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "tools" in params


@runtime_checkable
class ToolCallingModel(Protocol):
    """A `LanguageModel` that can call tools: ``stream_chat(..., tools=[Tool.schema(), ...])`` yields
    `ToolCall` objects among its text pieces (each once its streamed arguments are complete; several
    may come in one answer, after or instead of text).  With ``tools`` None or empty it behaves as a
    plain `LanguageModel`.  The messages then may hold the assistant's ``tool_calls`` and ``tool``
    results (see `ChatMessage`).  An engine that cannot honour ``tools`` raises `ModelError` (kind
    ``"tools_unsupported"``) before generating anything.
    """

    name: str

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        ticket: WorkTicket | None = None,
        usage: LlmUsage | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncGenerator[str | ToolCall, None]: ...


# --------------------------------------------------------------------- TTS
@runtime_checkable
class SpeechSynthesizer(Protocol):
    name: str
    #: rate of the int16 audio it yields
    sample_rate: int

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Blocking generator: int16 mono chunks at `sample_rate`, in order."""
        ...


# --------------------------------------------------------------------- end of turn
@runtime_checkable
class TurnCompletionModel(Protocol):
    """Semantic end-of-turn: does the caller's turn sound finished?

    Implementations may also offer ``async probability_async(audio) -> float``
    (a worker thread, or a fake's sleep on virtual time); agent/end_of_turn.py
    prefers it and otherwise runs `probability` in a worker thread.
    """

    name: str
    #: "cpu" | "cuda": where it runs
    device: str

    def probability(self, audio: np.ndarray) -> float:
        """Blocking.  ``audio``: the turn so far, float32 mono 16 kHz in [-1, 1].
        Returns P(the turn is complete), 0..1; failures raise `ModelError`."""
        ...
