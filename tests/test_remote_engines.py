"""The remote STT and TTS engines (models/stt_openai.py, models/tts_openai.py) and what they share
with the remote LLM (models/remote.py), against a *fake OpenAI-compatible audio server*.

`FakeAudioServer` is a fake: an aiohttp app on 127.0.0.1 that answers
``/v1/audio/transcriptions`` and ``/v1/audio/speech`` as a scenario says
(verbose_json or plain json, Server-Timing or none, 503 then 200, 500, a
stream that stops mid-way, a stall, 1-byte writes, a WAV answer), and
records what it was sent.  Real sockets, so real time: every wait is short
and bounded (sockets and virtual time do not mix, tests/test_llm_failures.py).
"""
from __future__ import annotations

import asyncio
import io
import json
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web

from sub300.agent.ledger import TurnLedger
from sub300.agent.playout import PlayoutQueue
from sub300.agent.reply import Reply, ReplySettings
from sub300.agent.tasks import TaskOwner
from sub300.models import remote
from sub300.models.protocols import (
    EndpointDropped,
    EndpointHTTPError,
    EndpointProtocolError,
    EndpointTimeout,
    EndpointUnreachable,
    ModelError,
)
from sub300.models.remote import mark_first_byte, parse_server_timing, retry_after_s
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.stt_openai import OpenAIRecognizer
from sub300.models.tts_openai import OpenAISynthesizer
from sub300.testing.fakes import FakeLlm

from .test_openai_llm import QUESTION, closed_port, serve

PCM = (np.arange(-300, 301, 3, dtype=np.int16) * 97).astype(np.int16)      # 201 samples: 402 bytes
VERBOSE = {"text": " Hello there. ", "language": "en", "duration": 1.0, "segments": [
    {"start": 0.0, "end": 0.5, "text": " Hello", "avg_logprob": -0.2, "no_speech_prob": 0.01},
    {"start": 0.5, "end": 1.5, "text": " there.", "avg_logprob": -0.5, "no_speech_prob": 0.03},
]}


@dataclass
class FakeAudioServer:
    """Fake OpenAI-compatible audio server; ``scenario`` picks its behaviour, ``requests`` what it got."""

    scenario: str = "ok"
    timing: str | None = None                  # a Server-Timing header to send
    requests: list[dict] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/speech", self.speech)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Server-Timing": self.timing} if self.timing else {}

    def _refused(self) -> web.Response | None:
        """503 (with Retry-After: 0) on the first request when the scenario says so; 500 always."""
        if self.scenario == "503_then_ok" and len(self.requests) == 1:
            return web.Response(status=503, text="busy", headers={"Retry-After": "0"})
        if self.scenario == "500":
            return web.json_response({"error": {"message": "model crashed"}}, status=500)
        return None

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload = form["file"]
        self.requests.append({"headers": dict(request.headers), "form": {k: v for k, v in form.items() if k != "file"},
                              "wav": upload.file.read()})          # type: ignore[union-attr]
        if (refused := self._refused()) is not None:
            return refused
        doc = VERBOSE if self.scenario != "plain" else {"text": "Hello there."}
        return web.json_response(doc, headers=self._headers())

    async def speech(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"headers": dict(request.headers), "json": await request.json()})
        if (refused := self._refused()) is not None:
            return refused
        if self.scenario == "stall":
            await asyncio.sleep(0.1)          # longer than the test's first-byte limit, short for the cleanup
        wav = self.scenario.startswith("wav")
        ctype = "audio/wav" if wav else "audio/pcm"
        resp = web.StreamResponse(headers={"Content-Type": ctype, **self._headers()})
        await resp.prepare(request)
        body = PCM.astype("<i2").tobytes()
        if wav:
            out = io.BytesIO()
            with wave.open(out, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16_000 if self.scenario == "wav_16k" else 24_000)
                w.writeframes(body)
            body = out.getvalue()
        try:
            if self.scenario == "drop":
                await resp.write(body[:101])      # an odd number of bytes, then the connection breaks
                await asyncio.sleep(0.02)
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.scenario == "endless":
                while True:
                    await resp.write(body)
                    await asyncio.sleep(0.005)
            step = 1 if self.scenario == "bytewise" else len(body)
            for i in range(0, len(body), step):
                await resp.write(body[i:i + step])
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


@asynccontextmanager
async def running(server: FakeAudioServer) -> AsyncIterator[str]:
    async with serve(server.app()) as url:
        yield f"{url}/v1"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Retries without the default backoff (milliseconds per test)."""
    monkeypatch.setattr(remote, "RETRY_BACKOFF_S", 0.001)


def stt_for(url: str, **kw) -> OpenAIRecognizer:
    return OpenAIRecognizer(url, "whisper-1", **{"response_timeout_s": 2.0, **kw})


def tts_for(url: str, **kw) -> OpenAISynthesizer:
    return OpenAISynthesizer(url, "tts-1", "alloy", **{"first_byte_timeout_s": 2.0, "idle_timeout_s": 2.0, **kw})


async def synthesize(tts: OpenAISynthesizer, ticket: WorkTicket | None = None) -> np.ndarray:
    try:
        async with asyncio.timeout(5):
            return np.concatenate([c async for c in tts.synthesize_async("Hello there.", ticket=ticket)])
    finally:
        await tts.aclose()


# ------------------------------------------------------------------ Server-Timing, headers
def test_server_timing_is_parsed_as_w3c_says():
    assert parse_server_timing('queue;dur=12.5, work;dur=80;desc="a, b", cache;desc=hit') == \
        {"queue": 12.5, "work": 80.0}
    assert parse_server_timing(["Queue;dur=1", "work;dur=2", "queue;dur=9"]) == {"queue": 1.0, "work": 2.0}
    assert parse_server_timing("queue;dur=x, work;dur=-1, db") == {} and parse_server_timing(None) == {}


def test_first_byte_splits_the_time_into_remote_queue_network_and_work():
    now = [10.0]
    ticket = WorkTicket(clock=lambda: now[0])
    ticket.mark_started()
    mark_first_byte(ticket, {"Server-Timing": "queue;dur=30, work;dur=50"}, now=10.1)
    assert ticket.remote_queue_s == pytest.approx(0.03) and ticket.network_s == pytest.approx(0.02)
    late = WorkTicket(clock=lambda: now[0])
    late.mark_started()
    mark_first_byte(late, {"Server-Timing": "queue;dur=300"}, now=10.1)    # a server's clock: clamped at 0
    assert late.network_s == 0.0 and late.remote_queue_s == pytest.approx(0.3)
    untimed = WorkTicket(clock=lambda: now[0])
    untimed.mark_started()
    mark_first_byte(untimed, {}, now=10.1)
    assert untimed.network_s is None and untimed.remote_queue_s is None


def test_retry_after_reads_seconds_and_dates():
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412475.0) == pytest.approx(5.0)


# ------------------------------------------------------------------ STT
@pytest.mark.parametrize("scenario", ["verbose", "plain"])
async def test_transcription_round_trip(scenario):
    server = FakeAudioServer(scenario)
    audio = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 0.5
    async with running(server) as url:
        stt = stt_for(url, language="en")
        try:
            got = await stt.transcribe_async(audio)
        finally:
            await stt.aclose()
    assert got.text == "Hello there." and got.audio_seconds == pytest.approx(0.5) and got.inference_seconds > 0
    if scenario == "verbose":
        # the worst segment's no-speech probability; log-probability weighted by segment length
        assert got.no_speech_prob == pytest.approx(0.03) and got.avg_logprob == pytest.approx(-0.4)
    else:
        assert got.no_speech_prob is None and got.avg_logprob is None
    (sent,) = server.requests
    assert sent["form"] == {"model": "whisper-1", "response_format": "verbose_json", "temperature": "0",
                            "language": "en"}
    with wave.open(io.BytesIO(sent["wav"])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (16000, 1, 2, 8000)
        pcm = np.frombuffer(w.readframes(8000), "<i2")
    assert np.abs(pcm / 32767.0 - audio).max() < 1e-4
    assert stt.name == f"openai-stt:whisper-1@{url.split('://')[1].split('/')[0]}" and stt.device == "remote"


async def test_server_timing_fills_the_ticket_and_the_ledger():
    server = FakeAudioServer(timing="queue;dur=1.5, work;dur=2")
    async with running(server) as url:
        stt = stt_for(url)
        ticket = WorkTicket(label="stt")
        try:
            await stt.transcribe_async(np.zeros(1600, np.float32), ticket=ticket)
            untimed = WorkTicket(label="stt")
            server.timing = None
            await stt.transcribe_async(np.zeros(1600, np.float32), ticket=untimed)
        finally:
            await stt.aclose()
    assert ticket.remote_queue_s == pytest.approx(0.0015) and ticket.network_s is not None
    assert 0.0 <= ticket.network_s < ticket.work_s      # type: ignore[operator]
    ledger = TurnLedger(1)
    ledger.record_engine("stt", ticket)
    assert ledger.network_ms["stt"] == round(ticket.network_s * 1000, 1)
    assert ledger.to_dict()["network_ms"] == {"stt": ledger.network_ms["stt"]}
    assert untimed.network_s is None and untimed.remote_queue_s is None      # no header: nothing guessed
    plain = TurnLedger(2)
    plain.record_engine("stt", untimed)
    assert plain.network_ms == {}


async def test_refused_connection_is_unreachable_after_the_configured_retries():
    stt = stt_for(f"http://127.0.0.1:{closed_port()}/v1", retries=2)
    with pytest.raises(EndpointUnreachable, match="cannot connect") as info:
        await stt.transcribe_async(np.zeros(160, np.float32))
    await stt.aclose()
    assert "after 2 retries" in "".join(info.value.__notes__) and "/v1/audio/transcriptions" in str(info.value)


async def test_503_then_200_succeeds_on_the_retry_and_500_is_not_retried():
    server = FakeAudioServer("503_then_ok")
    async with running(server) as url:
        stt = stt_for(url, retries=1)
        try:
            assert (await stt.transcribe_async(np.zeros(160, np.float32))).text == "Hello there."
            assert len(server.requests) == 2
            server.scenario, server.requests = "500", []
            with pytest.raises(EndpointHTTPError, match="HTTP 500.*model crashed") as info:
                await stt.transcribe_async(np.zeros(160, np.float32))
        finally:
            await stt.aclose()
    assert info.value.kind == "http_5xx" and len(server.requests) == 1


async def test_urgency_and_bearer_headers(monkeypatch):
    from sub300.agent.config import Config
    from sub300.agent.engines import STT_ENGINES, TTS_ENGINES

    server = FakeAudioServer()
    monkeypatch.setenv("SUB300_STT_API_KEY", "sk-stt")
    monkeypatch.delenv("SUB300_TTS_API_KEY", raising=False)
    async with running(server) as url:
        c = Config()
        c.stt.engine = c.tts.engine = "openai"
        c.stt.base_url = c.tts.base_url = url
        stt, tts = STT_ENGINES["openai"](c), TTS_ENGINES["openai"](c)
        try:
            await stt.transcribe_async(np.zeros(160, np.float32), ticket=WorkTicket(Urgency.SPECULATIVE))  # type: ignore[attr-defined]
            await synthesize(tts, WorkTicket(Urgency.SLACK))     # type: ignore[arg-type]
        finally:
            await stt.aclose()      # type: ignore[attr-defined]
    stt_headers, tts_headers = server.requests[0]["headers"], server.requests[1]["headers"]
    assert stt_headers["X-Sub300-Urgency"] == "speculative" and stt_headers["Authorization"] == "Bearer sk-stt"
    assert tts_headers["X-Sub300-Urgency"] == "slack" and "Authorization" not in tts_headers


# ------------------------------------------------------------------ TTS
@pytest.mark.parametrize("scenario", ["ok", "bytewise", "wav"])
async def test_speech_streams_exact_pcm(scenario):
    server = FakeAudioServer(scenario, timing="queue;dur=0, work;dur=1")
    ticket = WorkTicket(label="tts")
    async with running(server) as url:
        audio = await synthesize(tts_for(url, sample_rate=24_000), ticket)
    assert audio.dtype == np.int16 and np.array_equal(audio, PCM)
    assert server.requests[0]["json"] == {"model": "tts-1", "input": "Hello there.", "voice": "alloy",
                                          "response_format": "pcm"}
    assert ticket.network_s is not None and ticket.remote_queue_s == 0.0 and ticket.finished is not None


async def test_a_wav_at_another_rate_is_a_clear_protocol_error():
    async with running(FakeAudioServer("wav_16k")) as url:
        with pytest.raises(EndpointProtocolError, match="16000 Hz, but tts.remote_sample_rate is 24000"):
            await synthesize(tts_for(url, sample_rate=24_000))


async def test_a_stream_that_stops_midway_is_dropped_and_never_retried():
    server = FakeAudioServer("drop")
    got: list[np.ndarray] = []
    async with running(server) as url:
        tts = tts_for(url, retries=3)
        with pytest.raises(EndpointDropped, match="connection dropped after 50 samples"):
            async with asyncio.timeout(5):
                async for chunk in tts.synthesize_async("Hello."):
                    got.append(chunk)
        await tts.aclose()
    assert np.array_equal(np.concatenate(got), PCM[:50]) and len(server.requests) == 1


async def test_first_byte_timeout():
    async with running(FakeAudioServer("stall")) as url:
        with pytest.raises(EndpointTimeout, match="first byte 0.02 s"):
            await synthesize(tts_for(url, first_byte_timeout_s=0.02))


async def test_barge_in_closing_the_generator_closes_the_servers_stream():
    server = FakeAudioServer("endless")
    async with running(server) as url:
        tts = tts_for(url)
        stream = tts.synthesize_async("A long story.")
        async with asyncio.timeout(5):
            assert len(await anext(stream)) > 0
            await stream.aclose()
            await server.disconnected.wait()         # the fake saw the client go
        await tts.aclose()


# ------------------------------------------------------------------ the reply: same handling as a local TTS
async def test_a_remote_tts_failing_mid_reply_fails_the_reply_with_its_typed_error():
    """As tests/test_llm_failures.py's local broken TTS: the reply raises the original typed error
    (no ExceptionGroup), which the conversation reports as a failed turn of stage tts."""
    async with running(FakeAudioServer("drop")) as url:
        tts = tts_for(url)
        owner = TaskOwner("test", expected=(ModelError,))
        loop = asyncio.get_running_loop()
        reply = Reply(turn=1, messages=QUESTION, llm=FakeLlm(["Hello there."]), tts=tts,
                      playout=PlayoutQueue(16000, loop.time), clock=loop.time, emit=lambda e: None,
                      settings=ReplySettings(60, 0.0, 20, fallback_text="Sorry.")).start(owner)
        assert reply.task is not None
        with pytest.raises(EndpointDropped, match="connection dropped after 50 samples") as info:
            async with asyncio.timeout(5):
                await reply.task
        assert not isinstance(info.value, BaseExceptionGroup) and info.value.kind == "dropped"
        await owner.aclose()
        await tts.aclose()


def test_blocking_paths():
    async def main() -> None:
        server = FakeAudioServer()
        async with running(server) as url:
            stt, tts = stt_for(url), tts_for(url)
            text = (await asyncio.to_thread(stt.transcribe, np.zeros(160, np.float32))).text
            audio = await asyncio.to_thread(lambda: np.concatenate(list(tts.synthesize("Hi."))))
            assert text == "Hello there." and np.array_equal(audio, PCM)
            assert json.loads(json.dumps(server.requests[1]["json"]))["input"] == "Hi."

    asyncio.run(main())


# ------------------------------------------------------------------ the remote LLM, metrics, traces
async def test_the_remote_llm_reads_server_timing_and_sends_the_urgency():
    from .test_openai_llm import client_for, delta, sse

    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        """Fake OpenAI-compatible chat endpoint: one SSE answer with a Server-Timing header."""
        seen.append(dict(request.headers))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Server-Timing": "queue;dur=4, work;dur=6"})
        await resp.prepare(request)
        await resp.write(sse(delta("Hi"), delta(None, "stop"), "[DONE]"))
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    ticket = WorkTicket(Urgency.SPECULATIVE, label="llm")
    async with serve(app) as url, client_for(f"{url}/v1") as llm:
        async with asyncio.timeout(5):
            assert [p async for p in llm.stream_chat(QUESTION, max_tokens=8, ticket=ticket)] == ["Hi"]
    assert seen[0]["X-Sub300-Urgency"] == "speculative"
    assert ticket.remote_queue_s == pytest.approx(0.004) and ticket.network_s is not None and ticket.network_s >= 0


def _remote_ledger() -> TurnLedger:
    """A finished turn's ledger whose TTS request went to an endpoint: 10 ms queue, 30 network, 50 work."""
    ledger = TurnLedger(1)
    ledger.mark("tts_start", 100.0)
    clock = iter([100.0, 100.0]).__next__
    ticket = WorkTicket(clock=clock)
    ticket.mark_started()                   # submitted = started = 100.0
    ticket.remote_queue_s, ticket.network_s = 0.010, 0.030
    ledger.record_engine("tts", ticket, work_end=100.090)
    return ledger


def test_the_network_part_is_a_metric_and_a_span_between_queue_and_work():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from sub300.agent.events import TurnFinished
    from sub300.agent.metrics import MetricsObserver
    from sub300.agent.tracing import TracingObserver

    ledger = _remote_ledger()
    assert (ledger.queue_ms["tts"], ledger.network_ms["tts"], ledger.work_ms["tts"]) == (10.0, 30.0, 50.0)
    event = TurnFinished(1, "Hi?", "Hello.", ledger)
    metrics = MetricsObserver(1000.0, registry=CollectorRegistry())
    metrics.call_started("sip", "c1")(event)
    sample = metrics.registry.get_sample_value
    assert sample("sub300_engine_network_seconds_sum", {"transport": "sip", "stage": "tts"}) == pytest.approx(0.03)
    assert sample("sub300_engine_network_seconds_count", {"transport": "sip", "stage": "stt"}) is None

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingObserver(provider, clock=lambda: 101.0)
    tracing.call_started("sip", "c1")(event)
    tracing.call_ended("sip", "c1", "hangup")
    spans = {s.name: s for s in exporter.get_finished_spans() if s.name.startswith("tts ")}
    queue, network, work = spans["tts queue"], spans["tts network"], spans["tts work"]
    assert queue.end_time == network.start_time and network.end_time == work.start_time
    assert (network.end_time - network.start_time) / 1e6 == pytest.approx(30.0, abs=0.01)


@pytest.mark.slow        # a real-time conversation: ~1.3 s; the reply-level test above is the fast one
async def test_a_conversation_reports_a_remote_tts_dropping_mid_reply_as_a_failed_tts_turn(config):
    """The same handling as a local TTS that fails (tests/test_llm_failures.py): a TurnFailed of stage
    tts with the error's kind, the metric, and the next turn answered once the endpoint recovers."""
    from sub300.agent.events import TurnFailed, TurnFinished
    from sub300.agent.metrics import MetricsObserver
    from sub300.testing.fakes import FakeStt, fake_engines, speech
    from sub300.testing.scripted_caller import ScriptedCaller

    server = FakeAudioServer("drop")
    async with running(server) as url:
        tts = tts_for(url, sample_rate=24_000)
        c = config.model_copy(deep=True)
        c.stt.partial_interval_ms = 0
        caller = ScriptedCaller(fake_engines(stt=FakeStt("Hello?", delay_s=0.01), tts=tts), c)   # type: ignore[arg-type]
        observer = MetricsObserver(300.0)
        caller.conversation.listeners.append(observer.call_started("test", "call-1"))
        try:
            async with asyncio.timeout(20):
                for scenario in ("drop", "ok"):
                    server.scenario = scenario
                    await caller.silence(0.05)
                    await caller.say(speech(0.3))
                    await caller.until_idle()
        finally:
            await caller.close()
            await tts.aclose()
    (failed,) = [e for e in caller.events if isinstance(e, TurnFailed)]
    assert (failed.turn, failed.stage, failed.failure) == (1, "tts", "dropped")
    assert [e.turn for e in caller.events if isinstance(e, TurnFinished)] == [2]
    assert observer.registry.get_sample_value("sub300_turn_failures_total",
                                              {"transport": "test", "stage": "tts", "kind": "dropped"}) == 1


async def test_remote_engines_skip_warm_up_and_the_local_tts_pool(config, caplog):
    """Warm-up sends nothing to a remote STT/TTS (it says so); the remote TTS is not put behind the
    1-worker local pool; `Engines.aclose` closes its session."""
    import logging

    from sub300.agent.engines import Engines, scheduled_tts, warm_up
    from sub300.testing.fakes import FakeLlm, FakeVad

    c = config.model_copy(deep=True)
    c.stt.engine = c.tts.engine = "openai"
    dead = f"http://127.0.0.1:{closed_port()}/v1"       # a request would fail: none must be sent
    stt, tts = stt_for(dead), tts_for(dead)
    assert scheduled_tts(tts, c) is tts
    engines = Engines(vad=FakeVad(), stt=stt, llm=FakeLlm(["Hi."]), tts=tts)
    with caplog.at_level(logging.INFO, logger="sub300.agent.engines"):
        await warm_up(engines, c)
    assert any("warm-up skips the remote stt and tts" in r.getMessage() for r in caplog.records)
    tts.endpoint.session()
    await engines.aclose()
    assert tts.endpoint._session is None


# ------------------------------------------------------------------ urgency changes across the hop
@pytest.mark.parametrize("stage", ["llm", "stt", "tts"])
async def test_a_promotion_on_the_media_node_reaches_the_model_nodes_ticket_while_it_runs(config, stage):
    """A request sent SPECULATIVE, promoted to COMMITTED on the media node while the model node works on it
    (its engine holds the request until the test releases it): the model node's ticket turns COMMITTED too;
    the endpoint answered the id back.  The STT's change is sent before its answer's first byte, the LLM's
    and TTS's after it."""
    from sub300.models.llm_openai import OpenAIChatModel
    from sub300.testing.fakes import FakeStt, FakeTts, fake_engines
    from sub300.web.server import build_app

    release = asyncio.Event()
    held: list[WorkTicket] = []

    class HeldLlm(FakeLlm):
        async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None, usage=None):
            held.append(ticket)
            ticket.mark_started()
            yield "One"
            await release.wait()
            yield " two."

    class HeldStt(FakeStt):
        async def transcribe_async(self, audio, *, ticket=None):
            held.append(ticket)
            await release.wait()
            return await super().transcribe_async(audio, ticket=ticket)

    class HeldTts(FakeTts):
        async def synthesize_async(self, text, *, ticket=None):
            held.append(ticket)
            ticket.mark_started()
            yield np.zeros(240, np.int16)
            await release.wait()
            yield np.zeros(240, np.int16)

    c = config.model_copy(deep=True)
    c.server.role = "model"
    node = fake_engines(llm=HeldLlm(), stt=HeldStt("Hello there.", delay_s=0.0), tts=HeldTts())
    ticket = WorkTicket(Urgency.SPECULATIVE, label=stage)
    async with serve(build_app(c, node)) as base:
        url = f"{base}/v1"
        engine = {"llm": lambda: OpenAIChatModel(url, "m"), "stt": lambda: stt_for(url),
                  "tts": lambda: tts_for(url)}[stage]()

        async def run() -> None:
            if stage == "llm":
                async for _ in engine.stream_chat(QUESTION, max_tokens=8, ticket=ticket):
                    pass
            elif stage == "stt":
                await engine.transcribe_async(np.zeros(8000, np.float32), ticket=ticket)
            else:
                async for _ in engine.synthesize_async("One. Two. Three.", ticket=ticket):
                    pass

        task = asyncio.create_task(run())
        try:
            async with asyncio.timeout(2):
                while not held:
                    await asyncio.sleep(0.002)
                assert held[0].urgency == Urgency.SPECULATIVE
                ticket.urgency = Urgency.COMMITTED              # the turn ended
                while held[0].urgency != Urgency.COMMITTED:
                    await asyncio.sleep(0.002)
            assert not task.done()                              # while it runs
            release.set()
            await asyncio.wait_for(task, 5)
        finally:
            release.set()
            await engine.aclose()
    assert engine.endpoint.takes_urgency_changes is True
    assert engine.endpoint.urgency_updates_sent == 1 and engine.endpoint.urgency_updates_failed == 0


async def test_an_endpoint_that_does_not_answer_the_id_back_is_sent_no_changes():
    """vLLM and hosted APIs ignore X-Sub300-Request-Id: after their first answer, nothing more is sent."""
    server = FakeAudioServer()
    async with running(server) as url:
        stt = stt_for(url)
        try:
            ticket = WorkTicket(Urgency.SLACK)
            await stt.transcribe_async(np.zeros(1600, np.float32), ticket=ticket)
            assert stt.endpoint.takes_urgency_changes is False
            await stt.transcribe_async(np.zeros(1600, np.float32), ticket=ticket)
        finally:
            await stt.aclose()
    assert len(server.requests[0]["headers"]["X-Sub300-Request-Id"]) >= 16
    assert "X-Sub300-Request-Id" not in server.requests[1]["headers"]
    assert stt.endpoint.urgency_updates_sent == stt.endpoint.urgency_updates_failed == 0


@pytest.mark.parametrize("status, code, said", [
    (500, None, "(HTTP 500: broken)"),
    (404, "not_found", "does a balancer send the change to another node?"),     # after the first byte
])
async def test_a_failed_urgency_change_is_logged_and_counted_and_the_request_goes_on(caplog, status, code, said):
    """The node answers the change 500, or 404 for a request it answered (another node got the change): a
    warning, ``urgency_updates_failed``, and the audio still comes whole."""
    import logging

    async def speech(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "audio/pcm",
                                           "X-Sub300-Request-Id": request.headers["X-Sub300-Request-Id"]})
        await resp.prepare(request)
        for _ in range(2):
            await resp.write(PCM.astype("<i2").tobytes())
            await asyncio.sleep(0.03)
        await resp.write_eof()
        return resp

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "broken", "code": code}}, status=status)

    app = web.Application()
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/requests/{id}/urgency", broken)
    ticket = WorkTicket(Urgency.SPECULATIVE)
    async with serve(app) as base:
        tts = tts_for(f"{base}/v1")
        try:
            with caplog.at_level(logging.WARNING, logger="sub300.models.remote"):
                chunks = []
                async for chunk in tts.synthesize_async("Hi.", ticket=ticket):
                    chunks.append(chunk)
                    ticket.urgency = Urgency.COMMITTED
                async with asyncio.timeout(2):
                    while tts.endpoint.urgency_updates_failed == 0:
                        await asyncio.sleep(0.002)
        finally:
            await tts.aclose()
    assert np.array_equal(np.concatenate(chunks), np.concatenate([PCM, PCM]))
    assert tts.endpoint.urgency_updates_failed == 1 and tts.endpoint.urgency_updates_sent == 0
    assert any("was not changed to committed" in r.getMessage() and said in r.getMessage() for r in caplog.records)
    # ... and visible in /metrics
    from prometheus_client import CollectorRegistry

    from sub300.agent.engines import Engines
    from sub300.agent.metrics import MetricsObserver
    from sub300.testing.fakes import FakeStt, FakeVad

    metrics = MetricsObserver(1000.0, registry=CollectorRegistry())
    metrics.watch_engines(Engines(vad=FakeVad(), stt=FakeStt("hi"), llm=FakeLlm(["Hi."]), tts=tts))
    assert metrics.registry.get_sample_value("sub300_remote_urgency_updates_total",
                                             {"stage": "tts", "result": "failed"}) == 1.0
    assert metrics.registry.get_sample_value("sub300_remote_urgency_updates_total",
                                             {"stage": "tts", "result": "sent"}) == 0.0
    assert metrics.registry.get_sample_value("sub300_remote_urgency_updates_total", {"stage": "stt",
                                                                                   "result": "sent"}) is None
