"""A SpeechRecognizer that posts to an OpenAI-compatible transcription endpoint.

``POST {base_url}/audio/transcriptions`` (OpenAI's audio API, which vLLM's
Whisper serving, faster-whisper-server/speaches and a sub300 model node
follow): multipart form with ``file`` (the audio as a 16-bit PCM mono 16 kHz
WAV), ``model``, ``response_format=verbose_json``, ``temperature=0`` and
``language`` when one is set.  The answer is JSON: ``text``, and with
verbose_json its ``segments``, whose ``no_speech_prob`` and ``avg_logprob``
(Whisper's own, as faster-whisper, vLLM and OpenAI report them) become the
`Transcript`'s: the highest ``no_speech_prob`` and the duration-weighted mean
``avg_logprob`` of the segments (a server without them, or answering plain
``json``: None, nothing guessed).

The HTTP client, failures, retries (a refused connection or 502/503/504,
before any answer: ``retries`` times), Bearer key, urgency header (and its
later changes, sent to ``{base_url}/requests/{id}/urgency``) and the
Server-Timing split of the ticket's time are models/remote.py's.  The whole
request, the wait for a connection included, is bounded by
``response_timeout_s``.  At most ``max_connections`` requests are open at
once; more wait by deadline class (the ticket's urgency), which is the
ticket's queue wait.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import wave
from typing import Any

import aiohttp
import numpy as np

from . import defaults
from .protocols import SAMPLE_RATE, EndpointDropped, EndpointTimeout, Transcript
from .remote import RemoteEndpoint, host_of
from .scheduling import Urgency, WorkTicket

log = logging.getLogger(__name__)


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """``audio`` (float32 mono in [-1, 1]; clipped) as a 16-bit PCM mono WAV file."""
    pcm = (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


class OpenAIRecognizer:
    """Transcribes through ``POST {base_url}/audio/transcriptions``; shared by all calls."""

    device = "remote"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        language: str | None = None,
        connect_timeout_s: float = defaults.OPENAI_CONNECT_TIMEOUT_S,
        response_timeout_s: float = 10.0,
        retries: int = 1,
        max_connections: int = 64,
    ) -> None:
        """Raises EndpointError for a base_url that is not http(s), ValueError for ``max_connections`` < 1
        or ``retries`` < 0."""
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = RemoteEndpoint("STT", f"{self.base_url}/audio/transcriptions", api_key=api_key,
                                       connect_timeout_s=connect_timeout_s, max_connections=max_connections,
                                       headers={"Accept": "application/json"}, requests_url=f"{self.base_url}/requests")
        self.url = self.endpoint.url
        self.model = model
        self.language = language or None
        self.response_timeout_s = response_timeout_s
        self.retries = retries
        self.name = f"openai-stt:{model}@{host_of(self.base_url)}"
        log.info("STT endpoint %s: model %s, up to %d requests at once (max_connections; more wait, "
                 "committed first), %d retr%s before an answer", self.url, model, max_connections, retries,
                 "y" if retries == 1 else "ies")

    def __repr__(self) -> str:
        return f"OpenAIRecognizer({self.url!r}, model={self.model!r})"

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (metrics)."""
        return self.endpoint.connections.waiting

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    def _form(self, audio: np.ndarray) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("file", wav_bytes(audio), filename="audio.wav", content_type="audio/wav")
        form.add_field("model", self.model)
        form.add_field("response_format", "verbose_json")
        form.add_field("temperature", "0")
        if self.language:
            form.add_field("language", self.language)
        return form

    async def transcribe_async(self, audio: np.ndarray, *, ticket: WorkTicket | None = None) -> Transcript:
        """Transcribe ``audio`` (float32 mono 16 kHz in [-1, 1]).

        The ticket is marked started when a connection is free (the request is sent then), finished
        when the answer has been read.  Raises the EndpointError family (models/remote.py):
        EndpointTimeout past ``response_timeout_s``, EndpointProtocolError for an answer that is
        not the transcription JSON.
        """
        return await self._transcribe(self.endpoint, audio, ticket or WorkTicket(Urgency.COMMITTED, label="stt"))

    async def _transcribe(self, endpoint: RemoteEndpoint, audio: np.ndarray, ticket: WorkTicket) -> Transcript:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline = t0 + self.response_timeout_s
        limit = f"response {self.response_timeout_s:g} s"
        form_audio = np.asarray(audio, np.float32)
        async with contextlib.AsyncExitStack() as stack:
            await endpoint.slot(ticket, deadline, stack, self.response_timeout_s)
            followed = endpoint.follow(ticket, stack)     # a promotion reaches the endpoint's ticket too
            # a callable body: each try builds its own (aiohttp's FormData can be sent once)
            resp = await endpoint.post(deadline=deadline, limit=limit, ticket=ticket, retries=self.retries,
                                       followed=followed, data=lambda: self._form(form_audio))
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await resp.read()
            except TimeoutError:
                resp.close()
                raise endpoint.error(f"no complete answer within {self.response_timeout_s:g} s", EndpointTimeout) \
                    from None
            except aiohttp.ClientError as exc:
                resp.close()
                raise endpoint.error(f"connection dropped while reading the answer ({type(exc).__name__})",
                                     EndpointDropped) from exc
            resp.release()
            text, no_speech, logprob = self._parse(endpoint, raw)
        return Transcript(text=text, audio_seconds=len(form_audio) / SAMPLE_RATE,
                          inference_seconds=loop.time() - t0, no_speech_prob=no_speech, avg_logprob=logprob)

    def _parse(self, endpoint: RemoteEndpoint, raw: bytes) -> tuple[str, float | None, float | None]:
        """The answer's text, max ``no_speech_prob`` and duration-weighted mean ``avg_logprob`` of
        its segments (None when absent).  Raises EndpointProtocolError."""
        try:
            doc = json.loads(raw)
        except ValueError:
            raise endpoint.error(f"malformed answer {raw[:80]!r} (expected JSON)") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise endpoint.error(f"answer without text: {raw[:80]!r}")
        segments = doc.get("segments")
        no_speech: float | None = None
        weighted, total = 0.0, 0.0
        if isinstance(segments, list):
            for seg in segments:
                if not isinstance(seg, dict):
                    raise endpoint.error(f"malformed segment {str(seg)[:80]!r}")
                p = _number(seg.get("no_speech_prob"))
                if p is not None:
                    no_speech = p if no_speech is None else max(no_speech, p)
                lp = _number(seg.get("avg_logprob"))
                if lp is not None:
                    start, end = _number(seg.get("start")), _number(seg.get("end"))
                    weight = max(end - start, 1e-3) if start is not None and end is not None else 1.0
                    weighted += lp * weight
                    total += weight
        return doc["text"].strip(), no_speech, (weighted / total if total else None)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Blocking (warm-up, scripts): runs the request on a private event loop in a worker thread,
        with a client of its own (closed after).  Never call it from the event loop's thread."""
        def run() -> Transcript:
            async def once() -> Transcript:
                endpoint = self.endpoint.fork()
                try:
                    return await self._transcribe(endpoint, audio, WorkTicket(Urgency.COMMITTED, label="stt"))
                finally:
                    await endpoint.aclose()
            return asyncio.run(once())

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="stt-openai") as pool:
            return pool.submit(run).result()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


__all__ = ["OpenAIRecognizer", "wav_bytes"]
