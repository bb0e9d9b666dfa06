"""The OpenAI-compatible audio routes: the process's shared STT and TTS engines over HTTP.

What a model node (``server.role = "model"``) serves to media nodes, and any
OpenAI client may use (``server.role = "all"`` serves them too):

``POST /v1/audio/transcriptions`` — OpenAI's shape: ``multipart/form-data``
with ``file`` (anything PyAV decodes: WAV, MP3, Ogg/Opus, FLAC, ...; decoded
and resampled to float32 16 kHz mono), ``model`` (any name: the configured
engine answers), optional ``language``, ``prompt``, ``response_format``,
``temperature``.  It runs on the process's shared recogniser
(``transcribe_async(audio, ticket=)``: models/stt_service.py, with its
deadline classes and batching), so calls of this node and requests of media
nodes share one queue.  Answers:

* ``json`` (default): ``{"text": ...}``; ``text``: the text alone
  (text/plain); ``verbose_json``: ``{"task": "transcribe", "language",
  "duration", "text", "segments": [...]}`` with one segment spanning the
  clip, carrying the engine's ``avg_logprob`` and ``no_speech_prob`` (null
  when the engine has none; Whisper here decodes a short clip as one
  segment and keeps no timestamps).  ``srt`` and ``vtt`` are refused (400).
* ``language``: the engine transcribes its configured language
  (``stt.language``); a request naming another one is refused (400), one
  naming it (or any, when the engine detects the language itself) is
  accepted.  ``prompt`` is accepted and ignored (the shared engine decodes
  every request the same way), ``temperature`` (0–1) likewise: decoding is
  the engine's configured beam search.

``POST /v1/audio/speech`` — JSON ``model`` (any name), ``input`` (required,
non-empty, at most ``server.speech_max_chars``), ``voice`` (accepted; the
configured voice speaks: one engine per process), ``response_format``
``pcm`` | ``wav`` (default ``wav``; OpenAI's default, mp3, and the other
compressed formats are refused with the supported list), ``speed`` (1.0
only), ``instructions`` (ignored), ``stream_format`` (``audio`` only).  The
audio streams as the engine synthesizes it (``synthesize_async(text,
ticket=)``: models/tts_service.py), chunked: ``pcm`` is raw 16-bit
little-endian mono at **24000 Hz** — OpenAI's pcm rate, whatever the
engine's own (Piper: 22050; resampled with agent/audio.py `StreamResampler`)
— with the header ``X-Sample-Rate: 24000``; ``wav`` is a WAV header whose
RIFF and data lengths are 0xFFFFFFFF (unknown: it is streamed) followed by
the same PCM.  The headers go out with the first chunk, so an engine that
fails at once gets an HTTP error; a failure after that closes the connection
without the chunked terminator (the client sees a truncated body, never a
clean end).  A client that goes away stops the synthesis at once: the
connection is watched every `DISCONNECT_POLL_S` and the synthesis task is
cancelled, which closes the engine's iterator (its worker thread stops at
its next chunk).

Both routes:

* answer ``Server-Timing: queue;dur=…, work;dur=…`` (web/server_timing.py;
  the transcription's work includes decoding the upload) and take the
  deadline class from ``X-Sub300-Urgency`` (absent: committed); a request
  with ``X-Sub300-Request-Id`` keeps its ticket under that id while it runs,
  so ``POST /v1/requests/{id}/urgency`` changes its class (web/request_urgency.py);
* need the API scope "model" and count as model requests for the limits
  (web/auth.py); their usage goes to the app's `MODEL_USAGE_KEY` sink like
  chat completions': ``stt_audio_s`` (seconds of decoded audio that reached
  the engine) and ``tts_chars`` (characters of an input whose synthesis
  started);
* answer errors in OpenAI's shape ``{"error": {"message", "type", "param",
  "code"}}``: 400 for a bad request (undecodable or empty audio, a bad
  field), 413 for an upload above ``server.audio_max_upload_bytes``, 502
  when the engine is itself
  a remote endpoint that failed, 500 for another engine failure (logged
  once, its message the engine's own sentence).  While the server drains,
  web/server.py answers new model requests 503 with ``Retry-After``.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiohttp import BodyPartReader, web

from sub300.agent.audio import StreamResampler
from sub300.agent.usage import STT_AUDIO_S, TTS_CHARS
from sub300.models.protocols import SAMPLE_RATE, EndpointError, ModelError, SpeechRecognizer, SpeechSynthesizer
from sub300.models.scheduling import WorkTicket
from sub300.models.threads import iterate_in_thread

from .auth import PRINCIPAL
from .openai_api import MODEL_USAGE_KEY
from .request_urgency import RequestIdError, echo_header, forget, track
from .server_timing import BadUrgency, request_urgency, server_timing

log = logging.getLogger(__name__)

#: the rate of the PCM /v1/audio/speech streams (Hz): OpenAI's ``pcm`` format is 24 kHz 16-bit mono
SPEECH_SAMPLE_RATE = 24_000
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json")
SPEECH_FORMATS = ("pcm", "wav")
#: how often (s) a streaming synthesis looks whether its client is still connected
DISCONNECT_POLL_S = 0.02
#: a text field of the multipart form (model, language, prompt, ...) longer than this is refused (bytes)
MAX_FORM_FIELD_BYTES = 16 * 1024


class BadRequest(ValueError):
    """A request the route refuses: ``status`` (400 or 413) and the OpenAI error's ``param``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error(status: int, message: str, err_type: str = "invalid_request_error", *, param: str | None = None,
           code: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """OpenAI's error shape (as web/openai_api.py answers it)."""
    return web.json_response({"error": {"message": message, "type": err_type, "param": param, "code": code}},
                             status=status, headers=headers)


def _engine_failure(exc: ModelError, engine: str) -> web.Response:
    """502 for a remote endpoint that failed, 500 for another engine failure; logged here, once."""
    log.warning("%s failed: %s", engine, exc)
    message = f"{engine} failed: {str(exc)[:500]}"
    if isinstance(exc, EndpointError):
        return _error(502, message, "upstream_error")
    return _error(500, message, "server_error")


# ------------------------------------------------------------------ decoding an upload
def decode_audio(data: bytes, max_seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of ``data`` (any container PyAV opens) as float32 mono at ``rate`` in [-1, 1].

    Raises `BadRequest` (400) for an empty upload, one PyAV cannot decode, one without audio or samples,
    and one longer than ``max_seconds`` (decoding stops there: a small compressed file cannot make the
    server decode hours)."""
    if not data:
        raise BadRequest("'file' is empty", param="file")
    limit = int(max_seconds * rate)
    parts: list[np.ndarray] = []
    count = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise BadRequest("'file' holds no audio stream", param="file")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            frames = (out for frame in container.decode(container.streams.audio[0])
                      for out in resampler.resample(frame))
            for out in _chain(frames, lambda: resampler.resample(None)):
                pcm = out.to_ndarray().reshape(-1)
                count += len(pcm)
                if count > limit:
                    raise BadRequest(f"the audio is longer than this server's limit of {max_seconds:g} s",
                                     param="file")
                parts.append(pcm)
    except BadRequest:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, EOFError) as error:
        raise BadRequest(f"'file' cannot be decoded as audio ({str(error)[:200]})", param="file") from None
    if count == 0:
        raise BadRequest("'file' holds no audio samples", param="file")
    return (np.concatenate(parts).astype(np.float32) / 32768.0).astype(np.float32, copy=False)


def _chain(frames: Any, tail: Callable[[], Any]) -> Any:
    yield from frames
    yield from tail()


async def _read_form(request: web.Request, max_bytes: int) -> tuple[bytes | None, dict[str, str]]:
    """The ``file`` part's bytes and the text fields of a multipart form.  Raises `BadRequest` (400/413)."""
    too_large = BadRequest(f"the upload is larger than this server's limit of {max_bytes} bytes", status=413,
                           param="file")
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise too_large
    if not request.content_type.startswith("multipart/form-data"):
        raise BadRequest("'file' is required: the request must be multipart/form-data with a 'file' part "
                         "(OpenAI's shape)", param="file")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as error:
        raise BadRequest(f"malformed multipart body ({error})") from None
    data: bytes | None = None
    fields: dict[str, str] = {}
    total = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        name = part.name or ""
        limit = max_bytes if name == "file" else MAX_FORM_FIELD_BYTES
        chunks: list[bytes] = []
        size = 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            total += len(chunk)
            if (name == "file" and size > limit) or total > max_bytes + MAX_FORM_FIELD_BYTES * 16:
                raise too_large
            if name != "file" and size > limit:
                raise BadRequest(f"form field {name!r} is longer than {limit} bytes", param=name)
            chunks.append(chunk)
        body = b"".join(chunks)
        if name == "file":
            data = body
        elif name:
            try:
                fields[name] = body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"form field {name!r} is not UTF-8 text", param=name) from None
    return data, fields


# ------------------------------------------------------------------ requests
@dataclass(frozen=True)
class TranscriptionRequest:
    response_format: str
    language: str | None


def parse_transcription_fields(fields: Mapping[str, str], engine_language: str | None) -> TranscriptionRequest:
    """Check the form's text fields (see the module docstring).  Raises `BadRequest`."""
    response_format = fields.get("response_format", "json").strip() or "json"
    if response_format not in TRANSCRIPT_FORMATS:
        raise BadRequest(f"response_format {response_format[:40]!r} is unsupported; supported: "
                         f"{', '.join(TRANSCRIPT_FORMATS)}", param="response_format")
    temperature = fields.get("temperature", "").strip()
    if temperature:
        try:
            value = float(temperature)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise BadRequest("'temperature' must be a number between 0 and 1", param="temperature")
    language = fields.get("language", "").strip().lower() or None
    if language is not None and engine_language and language != engine_language.lower():
        raise BadRequest(f"this server transcribes {engine_language!r} only, not {language[:20]!r}",
                         param="language")
    return TranscriptionRequest(response_format, engine_language or language)


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    response_format: str


def parse_speech_request(body: Any, max_chars: int) -> SpeechRequest:
    """Check a /v1/audio/speech body (see the module docstring).  Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("'input' is required and must be a non-empty string", param="input")
    if len(text) > max_chars:
        raise BadRequest(f"'input' has {len(text)} characters; this server allows at most {max_chars}",
                         param="input")
    for name in ("model", "voice", "instructions"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise BadRequest(f"'{name}' must be a string", param=name)
    response_format = body.get("response_format")
    if response_format is None:
        response_format = "wav"
    if response_format not in SPEECH_FORMATS:
        raise BadRequest(f"response_format {str(response_format)[:40]!r} is unsupported; supported: "
                         f"{', '.join(SPEECH_FORMATS)}", param="response_format")
    speed = body.get("speed")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int | float) or speed != 1.0):
        raise BadRequest("only speed 1.0 is supported", param="speed")
    stream_format = body.get("stream_format")
    if stream_format is not None and stream_format != "audio":
        raise BadRequest("only stream_format 'audio' is supported (no server-sent events)", param="stream_format")
    return SpeechRequest(text, response_format)


def wav_stream_header(rate: int) -> bytes:
    """A 44-byte WAV header for 16-bit mono PCM at ``rate`` whose RIFF and data sizes are 0xFFFFFFFF:
    the length is unknown while it streams (what streaming servers send; most readers then read to the end)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


# ------------------------------------------------------------------ the routes
class AudioApi:
    """The two routes over ``stt`` and ``tts`` (the process's shared engines).

    ``language``: the recogniser's configured language ("" or None: it detects); ``clock``: the tickets'
    (monotonic).  Limits: see the module docstring."""

    def __init__(self, stt: SpeechRecognizer, tts: SpeechSynthesizer, *, language: str | None = None,
                 max_upload_bytes: int = 25 * 1024 * 1024, max_audio_s: float = 600.0,
                 max_speech_chars: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.stt, self.tts = stt, tts
        self.language = language or None
        self.max_upload_bytes, self.max_audio_s, self.max_speech_chars = max_upload_bytes, max_audio_s, max_speech_chars
        self.clock = clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/speech", self.speech)

    # ------------------------------------------------------------ shared
    def _ticket(self, request: web.Request, label: str) -> WorkTicket:
        """The request's ticket, kept under its ``X-Sub300-Request-Id`` (web/request_urgency.py) until the
        handler returns.  Raises `BadUrgency`, `RequestIdError`."""
        ticket = WorkTicket(request_urgency(request), clock=self.clock, label=label)
        track(request, ticket)
        return ticket

    def _report(self, request: web.Request, usage: Mapping[str, float], status: int) -> None:
        """Tell the app's `ModelUsageSink` (if any) what this request consumed; a failing sink is logged."""
        sink = request.app.get(MODEL_USAGE_KEY)
        if sink is None:
            return
        principal = request.get(PRINCIPAL)
        try:
            sink.model_request(getattr(principal, "key_id", None),
                               getattr(principal, "source", None) or request.remote, request.path,
                               {k: v for k, v in usage.items() if v}, status)
        except Exception:
            log.exception("the model usage sink failed on %s", request.path)

    # ------------------------------------------------------------ transcriptions
    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._transcribe)

    async def _answer(self, request: web.Request,
                      work: Callable[[web.Request, dict[str, float]], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """Run one route's ``work(request, usage)``; whatever happens, the request's urgency entry is
        forgotten and its usage reported with the status answered (500 when it raised)."""
        usage: dict[str, float] = {}
        response: web.StreamResponse | None = None
        try:
            response = await work(request, usage)
            return response
        finally:
            forget(request)
            self._report(request, usage, 500 if response is None else response.status)

    async def _transcribe(self, request: web.Request, usage: dict[str, float]) -> web.StreamResponse:
        try:
            ticket = self._ticket(request, "stt api")
            data, fields = await _read_form(request, self.max_upload_bytes)
            if data is None:
                raise BadRequest("'file' is required (multipart/form-data)", param="file")
            if fields.get("model") is not None and not fields["model"].strip():
                raise BadRequest("'model' must not be empty", param="model")
            req = parse_transcription_fields(fields, self.language)
            t0 = self.clock()
            audio = await asyncio.to_thread(decode_audio, data, self.max_audio_s)
            decode_s = self.clock() - t0
        except BadUrgency as exc:
            return _error(400, str(exc), code="invalid_urgency")
        except RequestIdError as exc:
            return exc.response()
        except BadRequest as exc:
            log.info("transcription refused: %s", exc)
            return _error(exc.status, str(exc), param=exc.param)
        duration = len(audio) / SAMPLE_RATE
        ticket.mark_submitted()
        try:
            transcribe_async = getattr(self.stt, "transcribe_async", None)
            if transcribe_async is not None:
                transcript = await transcribe_async(audio, ticket=ticket)
            else:   # an engine without a scheduler: its whole time is work
                ticket.mark_started()
                transcript = await asyncio.to_thread(self.stt.transcribe, audio)
                ticket.mark_finished()
        except ModelError as exc:
            if ticket.started is not None:
                usage[STT_AUDIO_S] = duration
            return _engine_failure(exc, f"speech recognition ({self.stt.name})")
        usage[STT_AUDIO_S] = duration
        headers = {"Server-Timing": server_timing(ticket, before_s=decode_s), **echo_header(request)}
        text = transcript.text
        if req.response_format == "text":
            return web.Response(text=text, content_type="text/plain", headers=headers)
        if req.response_format == "json":
            return web.json_response({"text": text}, headers=headers)
        return web.json_response({
            "task": "transcribe",
            "language": req.language,
            "duration": round(duration, 3),
            "text": text,
            "segments": [{
                "id": 0, "seek": 0, "start": 0.0, "end": round(duration, 3), "text": text, "tokens": [],
                "temperature": 0.0, "avg_logprob": transcript.avg_logprob, "compression_ratio": None,
                "no_speech_prob": transcript.no_speech_prob,
            }],
        }, headers=headers)

    # ------------------------------------------------------------ speech
    async def speech(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._speak)

    async def _speak(self, request: web.Request, usage: dict[str, float]) -> web.StreamResponse:
        try:
            ticket = self._ticket(request, "tts api")
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge as exc:
                raise BadRequest(exc.text or "request too large", status=413) from None
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise BadRequest("request body is not valid JSON") from None
            req = parse_speech_request(body, self.max_speech_chars)
        except BadUrgency as exc:
            return _error(400, str(exc), code="invalid_urgency")
        except RequestIdError as exc:
            return exc.response()
        except BadRequest as exc:
            log.info("speech refused: %s", exc)
            return _error(exc.status, str(exc), param=exc.param)

        sent: list[web.StreamResponse] = []   # the response once its headers went out
        streaming = asyncio.ensure_future(self._stream_speech(request, req, ticket, usage, sent))
        watching = asyncio.ensure_future(_until_gone(request))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not streaming.done():    # the client left (or this handler was cancelled): stop the synthesis
                streaming.cancel()
                with suppress(asyncio.CancelledError):
                    await streaming
                if watching.done():
                    log.info("speech: the client left; synthesis stopped")
            watching.cancel()
        if streaming.cancelled():   # the connection is gone: nothing more is sent
            return sent[0] if sent else web.Response(status=499)
        return streaming.result()

    async def _stream_speech(self, request: web.Request, req: SpeechRequest, ticket: WorkTicket,
                             usage: dict[str, float], sent: list[web.StreamResponse]) -> web.StreamResponse:
        ticket.mark_submitted()
        resampler = StreamResampler(self.tts.sample_rate, SPEECH_SAMPLE_RATE)
        chunks = _synthesize(self.tts, req.text, ticket)
        response: web.StreamResponse | None = None
        try:
            async for chunk in chunks:
                pcm = resampler.process(np.asarray(chunk, dtype=np.int16).reshape(-1))
                if response is None:
                    response = await self._start_stream(request, req, ticket, sent)
                if len(pcm):
                    await response.write(pcm.astype("<i2").tobytes())
            tail = resampler.flush()
            if response is None:   # the engine said nothing: an empty stream, still a success
                response = await self._start_stream(request, req, ticket, sent)
            if len(tail):
                await response.write(tail.astype("<i2").tobytes())
            await response.write_eof()
            return response
        except ModelError as exc:
            if response is None:
                return _engine_failure(exc, f"speech synthesis ({self.tts.name})")
            log.warning("speech synthesis (%s) failed mid-stream: %s; the connection is closed", self.tts.name, exc)
            if request.transport is not None:
                request.transport.close()   # no chunked terminator: the client sees a truncated body
            return response
        except ConnectionError:
            log.info("speech: the client left mid-stream; synthesis stopped")
            return response if response is not None else web.Response(status=499)
        finally:
            await chunks.aclose()
            if ticket.started is not None:   # the engine worked on it (a client that left early included)
                usage[TTS_CHARS] = len(req.text)

    async def _start_stream(self, request: web.Request, req: SpeechRequest, ticket: WorkTicket,
                            sent: list[web.StreamResponse]) -> web.StreamResponse:
        """Send the headers now that the first chunk is ready (Server-Timing's work ends here)."""
        response = web.StreamResponse(headers={
            "Content-Type": "audio/pcm" if req.response_format == "pcm" else "audio/wav",
            "X-Sample-Rate": str(SPEECH_SAMPLE_RATE),
            "Server-Timing": server_timing(ticket),
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **echo_header(request),
        })
        response.enable_chunked_encoding()
        sent.append(response)
        await response.prepare(request)
        if req.response_format == "wav":
            await response.write(wav_stream_header(SPEECH_SAMPLE_RATE))
        return response


async def _synthesize(tts: SpeechSynthesizer, text: str, ticket: WorkTicket) -> AsyncGenerator[np.ndarray, None]:
    """The engine's chunks for ``text``: its scheduled coroutine when it has one, else its blocking
    iterator in a worker thread (its whole time is then work)."""
    synthesize_async = getattr(tts, "synthesize_async", None)
    if synthesize_async is not None:
        chunks = synthesize_async(text, ticket=ticket)
    else:
        ticket.mark_started()
        chunks = iterate_in_thread(lambda: tts.synthesize(text), name="tts api")
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        ticket.mark_finished()


async def _until_gone(request: web.Request) -> None:
    """Return once ``request``'s connection is closed (polled: aiohttp does not cancel a handler whose
    client leaves, and a synthesis waiting for its next chunk writes nothing that would fail)."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def add_audio_routes(app: web.Application, stt: SpeechRecognizer, tts: SpeechSynthesizer, **kw: Any) -> AudioApi:
    """Serve ``stt`` and ``tts`` on /v1/audio/* of ``app`` (keywords: `AudioApi`'s); returns the routes' owner."""
    api = AudioApi(stt, tts, **kw)
    api.add_routes(app)
    return api


__all__ = ["SPEECH_SAMPLE_RATE", "AudioApi", "BadRequest", "add_audio_routes", "decode_audio",
           "parse_speech_request", "parse_transcription_fields", "wav_stream_header"]
