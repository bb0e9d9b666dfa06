"""Traces of calls (agent/tracing.py): the span tree of a fake-engine call on virtual time, in memory and
received over OTLP/HTTP by a real receiver on loopback; a collector that is down costs the call nothing."""
from __future__ import annotations

import asyncio
import copy
import logging
import socket
import threading
import time

import pytest
from aiohttp import web

from sub300.agent.calls import CallContext
from sub300.agent.events import TurnFailed, TurnFinished
from sub300.agent.ledger import STAGES, TOOL_STAGES
from sub300.agent.tracing import TracingObserver, setup_tracing
from sub300.models.protocols import ModelError
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sub300.testing.clock import loop_clock, run_virtual

STAGE_NAMES = [stage for stage, _ in STAGES if stage not in TOOL_STAGES]   # a turn without tools


def _engines(stt_error: ModelError | None = None):
    stt = FakeStt("What is the capital of France?", delay_s=0.105, **({"error": stt_error} if stt_error else {}))
    return fake_engines(stt=stt, llm=FakeLlm(["Sure", ".", " Paris", " is", " lovely", "."], first_token_s=0.045,
                                             per_token_s=0.01),
                        tts=FakeTts(delay_s=0.033, ms_per_piece=300.0))


def _call(config, provider, *, turns: int = 2, stt_error: ModelError | None = None):
    """One call of ``turns`` questions on fake engines in virtual time, traced into ``provider``."""

    async def call():
        c = copy.deepcopy(config)
        c.stt.tail_ms = 0
        clock = loop_clock()
        observer = TracingObserver(provider, clock=clock)
        caller = ScriptedCaller(_engines(stt_error), c, clock=clock)
        caller.conversation.listeners.append(observer.call_started("webrtc", "call-1", CallContext(key_id="k1")))
        try:
            for _ in range(turns):
                await caller.silence(0.5)
                await caller.say(speech(1.0))
                await caller.until_idle()
        finally:
            await caller.close()
            observer.call_ended("webrtc", "call-1", "hangup")
        assert observer.open_calls == 0
        return caller

    return run_virtual(call())


def _tree(spans):
    """name → [span], and each span's parent span (None for the root)."""
    by_id = {s.context.span_id: s for s in spans}
    named: dict[str, list] = {}
    for s in spans:
        named.setdefault(s.name, []).append(s)
    return named, (lambda s: by_id.get(s.parent.span_id) if s.parent is not None else None)


def _check_tree(spans, ledgers) -> None:
    """The span tree nests as agent/tracing.py says and its stage spans add up as each turn's ledger says."""
    named, parent = _tree(spans)
    (call,) = named["call"]
    assert parent(call) is None and len({s.context.trace_id for s in spans}) == 1
    assert call.attributes["sub300.transport"] == "webrtc" and call.attributes["sub300.key.id"] == "k1"
    assert call.attributes["sub300.call.end_reason"] == "hangup"
    turns = sorted(named["turn"], key=lambda s: s.attributes["sub300.turn"])
    assert [t.attributes["sub300.turn"] for t in turns] == [ledger.turn for ledger in ledgers]
    for turn, ledger in zip(turns, ledgers, strict=True):
        assert parent(turn) is call and call.start_time <= turn.start_time <= turn.end_time <= call.end_time
        children = [s for s in spans if parent(s) is turn]
        (v2v,) = [s for s in children if s.name == "voice_to_voice"]
        stages = sorted((s for s in spans if parent(s) is v2v), key=lambda s: s.start_time)
        assert [s.name for s in stages] == STAGE_NAMES
        assert stages[0].start_time == v2v.start_time and stages[-1].end_time == v2v.end_time
        for before, after in zip(stages, stages[1:], strict=False):
            assert before.end_time == after.start_time     # back to back: the critical path
        for s in stages:
            assert (s.end_time - s.start_time) / 1e6 == pytest.approx(ledger.stages_ms()[s.name], abs=0.01)
        assert (v2v.end_time - v2v.start_time) / 1e6 == pytest.approx(ledger.voice_to_voice_ms, abs=0.01)
        assert (turn.end_time - turn.start_time) / 1e9 == pytest.approx(
            ledger.marks["last_audio_out"] - ledger.marks["speech_start"], abs=1e-6)
        engines = {s.name: s for s in children if s.name.endswith((" queue", " work"))}
        for engine in ("stt", "llm", "tts"):
            queue, work = engines[f"{engine} queue"], engines[f"{engine} work"]
            assert queue.end_time == work.start_time
            assert (work.end_time - work.start_time) / 1e6 == pytest.approx(ledger.work_ms[engine], abs=0.01)
            assert (queue.end_time - queue.start_time) / 1e6 == pytest.approx(ledger.queue_ms[engine], abs=0.01)
        assert turn.attributes["sub300.note.speculative"] == ledger.notes["speculative"]


def test_a_call_is_one_trace_with_a_turn_span_and_stage_spans_that_add_up(config):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller = _call(config, provider)
    ledgers = [e.ledger for e in caller.events if isinstance(e, TurnFinished)]
    assert len(ledgers) == 2
    _check_tree(exporter.get_finished_spans(), ledgers)


def test_a_failed_turn_is_a_turn_span_with_status_error(config):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    caller = _call(config, provider, turns=1, stt_error=ModelError("stt down"))
    (failed,) = [e for e in caller.events if isinstance(e, TurnFailed)]
    named, parent = _tree(exporter.get_finished_spans())
    (turn,) = named["turn"]
    assert parent(turn) is named["call"][0]
    assert turn.status.status_code.name == "ERROR" and turn.status.description == "stt down"
    assert turn.attributes["error.type"] == failed.failure and turn.attributes["sub300.failure.stage"] == "stt"


class _OtlpReceiver:
    """A real OTLP/HTTP traces receiver on 127.0.0.1 (aiohttp, on its own thread): decodes each
    `ExportTraceServiceRequest` (opentelemetry-proto) and keeps its spans with their resource."""

    def __init__(self) -> None:
        self.requests: list = []
        self.received = threading.Event()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _export(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        self.received.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self.runner = web.AppRunner(app)
        self._loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> _OtlpReceiver:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class _Received:
    """A span decoded from OTLP, shaped like the SDK's (name, ids, parent, times, attributes)."""

    def __init__(self, span) -> None:
        from types import SimpleNamespace

        self.name = span.name
        self.context = SimpleNamespace(span_id=span.span_id, trace_id=span.trace_id)
        self.parent = SimpleNamespace(span_id=span.parent_span_id) if span.parent_span_id else None
        self.start_time, self.end_time = span.start_time_unix_nano, span.end_time_unix_nano
        self.attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def test_otlp_http_receiver_on_loopback_gets_one_trace_per_call(config):
    with _OtlpReceiver() as receiver:
        c = copy.deepcopy(config)
        c.telemetry.otlp_endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
        c.telemetry.service_name = "sub300-test"
        provider = setup_tracing(c)
        assert provider is not None
        try:
            caller = _call(c, provider)
            assert provider.force_flush(10_000)
        finally:
            provider.shutdown()
        assert receiver.received.wait(5)
    resources = [rs for request in receiver.requests for rs in request.resource_spans]
    names = {a.value.string_value for rs in resources for a in rs.resource.attributes if a.key == "service.name"}
    assert names == {"sub300-test"}
    spans = [_Received(s) for rs in resources for ss in rs.scope_spans for s in ss.spans]
    _check_tree(spans, [e.ledger for e in caller.events if isinstance(e, TurnFinished)])


def test_a_collector_that_is_down_is_logged_and_the_call_goes_on(config, caplog):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"http://127.0.0.1:{port}/v1/traces",
                                                                    timeout=0.5)))
    with caplog.at_level(logging.WARNING):
        caller = _call(config, provider, turns=1)   # no exception reaches the call
        started = time.monotonic()
        provider.shutdown()
    assert time.monotonic() - started < 5.0
    assert len([e for e in caller.events if isinstance(e, TurnFinished)]) == 1
    assert any(r.name.startswith("opentelemetry") and "export" in r.getMessage().lower() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_no_endpoint_no_tracing(config):
    assert setup_tracing(config) is None
