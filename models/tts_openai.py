"""A SpeechSynthesizer that streams from an OpenAI-compatible speech endpoint.

``POST {base_url}/audio/speech`` with ``{"model", "input", "voice",
"response_format": "pcm"}`` (OpenAI's audio API; a sub300 model node serves
it): the answer is raw 16-bit little-endian mono PCM at ``sample_rate``
(OpenAI's "pcm" is 24 kHz; tts.remote_sample_rate), read as it streams in and
yielded as int16 chunks; a read that ends on an odd byte keeps it for the
next.  An ``audio/wav`` answer (a server that ignores "pcm") is accepted too:
its RIFF header is read with the stdlib `wave` module and must say 16-bit
mono at ``sample_rate`` (anything else is an EndpointProtocolError that says
what came; nothing is resampled silently).

Limits: the first audio (the wait for a connection, connecting, the
endpoint's queue and its first chunk) within ``first_byte_timeout_s``; each
later gap within ``idle_timeout_s``.  A request that failed before any answer
(refused, 502/503/504) is retried ``retries`` times (models/remote.py); once
the answer has begun nothing is retried (its audio may be playing): a stream
that breaks off is an EndpointDropped.  Closing the generator (barge-in) or
cancelling its consumer closes the HTTP connection at once, so the endpoint
stops synthesizing.  At most ``max_connections`` syntheses at once; more wait
by deadline class (first pieces first): this engine has no local worker pool.
A change of a ticket's class after its request was sent follows it to the
endpoint (``{base_url}/requests/{id}/urgency``, models/remote.py `follow`).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import struct
import threading
import wave
from collections.abc import AsyncGenerator, Callable, Iterator

import aiohttp
import numpy as np

from . import defaults
from .protocols import EndpointDropped, EndpointError, EndpointTimeout
from .remote import RemoteEndpoint, host_of
from .scheduling import Urgency, WorkTicket

log = logging.getLogger(__name__)

#: content types read as raw 16-bit PCM (OpenAI answers "pcm" as audio/pcm; others send octet-stream or L16)
_RAW_TYPES = frozenset({"audio/pcm", "application/octet-stream", "audio/l16", "audio/raw"})
_WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
#: a WAV header larger than this without a "data" chunk is not a WAV header
_MAX_WAV_HEADER = 64 * 1024


class OpenAISynthesizer:
    """Synthesizes through ``POST {base_url}/audio/speech``; shared by all calls."""

    device = "remote"

    def __init__(
        self,
        base_url: str,
        model: str,
        voice: str,
        *,
        sample_rate: int = 24_000,
        api_key: str | None = None,
        connect_timeout_s: float = defaults.OPENAI_CONNECT_TIMEOUT_S,
        first_byte_timeout_s: float = 10.0,
        idle_timeout_s: float = 10.0,
        retries: int = 1,
        max_connections: int = 64,
    ) -> None:
        """Raises EndpointError for a base_url that is not http(s), ValueError for ``max_connections`` < 1,
        ``retries`` < 0 or ``sample_rate`` <= 0."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate!r}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = RemoteEndpoint("TTS", f"{self.base_url}/audio/speech", api_key=api_key,
                                       connect_timeout_s=connect_timeout_s, max_connections=max_connections,
                                       requests_url=f"{self.base_url}/requests")
        self.url = self.endpoint.url
        self.model = model
        self.voice = voice
        self.sample_rate = sample_rate
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.retries = retries
        self.name = f"openai-tts:{model}/{voice}@{host_of(self.base_url)}"
        log.info("TTS endpoint %s: model %s voice %s, %d Hz PCM, up to %d syntheses at once (max_connections; "
                 "more wait, first pieces first)", self.url, model, voice, sample_rate, max_connections)

    def __repr__(self) -> str:
        return f"OpenAISynthesizer({self.url!r}, model={self.model!r}, voice={self.voice!r})"

    @property
    def waiting(self) -> int:
        """Syntheses waiting for a connection (metrics)."""
        return self.endpoint.connections.waiting

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    async def synthesize_async(self, text: str, *, ticket: WorkTicket | None = None) -> AsyncGenerator[np.ndarray, None]:
        """int16 mono chunks at ``sample_rate`` as they arrive.  The ticket is marked started when a
        connection is free (the request is sent), finished when the stream ends or is closed.
        Raises the EndpointError family (models/remote.py)."""
        ticket = ticket or WorkTicket(Urgency.COMMITTED, label="tts")
        async for chunk in self._synthesize(self.endpoint, text, ticket):
            yield chunk

    async def _synthesize(self, endpoint: RemoteEndpoint, text: str,
                          ticket: WorkTicket) -> AsyncGenerator[np.ndarray, None]:
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + self.first_byte_timeout_s
        payload = {"model": self.model, "input": text, "voice": self.voice, "response_format": "pcm"}
        async with contextlib.AsyncExitStack() as stack:
            await endpoint.slot(ticket, first_deadline, stack, self.first_byte_timeout_s)
            followed = endpoint.follow(ticket, stack)     # a promotion reaches the endpoint's ticket too
            resp = await endpoint.post(deadline=first_deadline, limit=f"first byte {self.first_byte_timeout_s:g} s",
                                       ticket=ticket, retries=self.retries, followed=followed, json=payload)
            finished = False
            try:
                ctype = resp.content_type.lower()
                if ctype in _WAV_TYPES:
                    wav = True
                elif ctype in _RAW_TYPES:
                    wav = False
                else:
                    raise endpoint.error(f"unexpected content type {ctype!r} (expected audio/pcm or audio/wav)")
                got_bytes = 0
                samples = 0
                pending = b""        # an odd trailing byte, or a WAV header not yet complete
                header_done = not wav
                while True:
                    deadline = first_deadline if not got_bytes else loop.time() + self.idle_timeout_s
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await resp.content.readany()
                    except TimeoutError:
                        if got_bytes:
                            raise endpoint.error(f"no audio for {self.idle_timeout_s:g} s after {samples} samples "
                                                 "(idle timeout)", EndpointTimeout) from None
                        raise endpoint.error(f"no audio within {self.first_byte_timeout_s:g} s",
                                             EndpointTimeout) from None
                    except aiohttp.ClientError as exc:
                        raise endpoint.error(f"connection dropped after {samples} samples ({type(exc).__name__})",
                                             EndpointDropped) from exc
                    if not data:
                        break
                    got_bytes += len(data)
                    pending += data
                    if not header_done:
                        start = _wav_data_start(pending, endpoint.error, self.sample_rate)
                        if start is None:
                            continue
                        pending, header_done = pending[start:], True
                    whole = len(pending) & ~1
                    if whole:
                        chunk = np.frombuffer(pending[:whole], dtype="<i2").astype(np.int16)
                        pending = pending[whole:]
                        samples += len(chunk)
                        yield chunk
                if not header_done:
                    raise endpoint.error(f"the WAV answer ended inside its header ({len(pending)} bytes)")
                if pending:
                    log.warning("TTS endpoint %s: the audio ended on an odd byte (dropped)", endpoint.url)
                finished = True
            finally:
                if finished:
                    resp.release()
                else:
                    # closed early (barge-in), cancelled or failed: drop the connection so the endpoint stops
                    resp.close()

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Blocking generator (warm-up, scripts): the stream on a private event loop in a worker thread,
        with a client of its own; chunks come as they arrive.  Closing the generator early stops the
        request.  Never iterate it on the event loop's thread."""
        chunks: queue.Queue[np.ndarray | BaseException | None] = queue.Queue()
        loop = asyncio.new_event_loop()
        task: asyncio.Task[None] | None = None

        async def pump() -> None:
            endpoint = self.endpoint.fork()
            try:
                async for chunk in self._synthesize(endpoint, text, WorkTicket(Urgency.COMMITTED, label="tts")):
                    chunks.put(chunk)
                chunks.put(None)
            except BaseException as exc:   # handed to the consumer, which raises it
                chunks.put(exc)
            finally:
                await endpoint.aclose()

        def run() -> None:
            nonlocal task
            task = loop.create_task(pump())
            loop.run_until_complete(task)
            loop.close()

        thread = threading.Thread(target=run, name="tts-openai", daemon=True)
        thread.start()
        ended = False
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
            ended = True
        finally:
            if not ended and task is not None:      # the consumer stopped early: stop the request
                with contextlib.suppress(RuntimeError):     # the loop already ended and closed
                    loop.call_soon_threadsafe(task.cancel)
            thread.join()


def _wav_data_start(head: bytes, error: Callable[[str], EndpointError], sample_rate: int) -> int | None:
    """Where the samples begin in a WAV answer whose first bytes are ``head`` (None: need more bytes).

    The RIFF chunks are walked up to ``data``; the header before it is read by `wave` (which needs
    no sample data).  Raises EndpointProtocolError (through ``error``) for a file that is not RIFF
    WAVE, or not 16-bit mono PCM at ``sample_rate``."""
    if len(head) < 12:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise error(f"the answer is not a WAV file (starts {head[:12]!r})")
    pos = 12
    while True:
        if len(head) < pos + 8:
            if pos > _MAX_WAV_HEADER:
                raise error("no data chunk in the first 64 KiB of the WAV answer")
            return None
        cid, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if cid == b"data":
            break
        pos += 8 + size + (size & 1)
    start = pos + 8
    try:
        with wave.open(io.BytesIO(head[:start])) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
    except (wave.Error, EOFError) as exc:
        raise error(f"unreadable WAV header ({exc})") from None
    if (channels, width) != (1, 2):
        raise error(f"the WAV answer is {channels} channel(s) of {8 * width}-bit samples; expected 16-bit mono")
    if rate != sample_rate:
        raise error(f"the WAV answer is at {rate} Hz, but tts.remote_sample_rate is {sample_rate} Hz "
                    "(set it to the endpoint's rate)")
    return start


__all__ = ["OpenAISynthesizer"]
