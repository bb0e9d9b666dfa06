"""OpenTelemetry traces of calls: one trace per call, a span per turn, a span per ledger stage.

A `CallObserver` (agent/calls.py).  The span tree of one call::

    call                      call_started → call_ended (kind SERVER)
    └── turn                  speech_start → last_audio_out, or the failure (status ERROR)
        ├── voice_to_voice    speech_end → first_audio_out
        │   ├── endpointing   the critical-path stages of `agent.ledger.STAGES`, back to back:
        │   ├── stt           each ends at its mark and starts where the previous one ended,
        │   ├── llm_first_token   so their durations add up to voice-to-voice exactly
        │   ├── first_piece       (`TurnLedger.stages_ms()`)
        │   ├── tts_first_audio
        │   └── send
        ├── stt queue / stt work  the engines' critical-path requests: the wait for the engine
        ├── llm queue / llm work  (`ledger.queue_ms`) then its work (`ledger.work_ms`), from the
        └── tts queue / tts work  request's start mark (stt_start, llm_start, tts_start)
                                  a remote engine (models/remote.py) has a ``network`` span between
                                  the two (`ledger.network_ms`: the wire time both ways, as one
                                  span; its queue then holds the endpoint's own queue wait too)

Spans are made after the fact, when the turn's `TurnFinished` / `TurnFailed`
arrives, with explicit start and end times: the ledger's marks are seconds
on the call's monotonic clock, turned into epoch nanoseconds with one offset
taken at the call's start (``time.time_ns() - clock()``), so a wall-clock
step during a call cannot tear a trace apart.

Attributes: the OpenTelemetry semantic conventions where one exists
(``error.type`` for a failure's kind); the rest are named ``sub300.*``
(``sub300.transport``, ``sub300.call.id``, ``sub300.key.id``,
``sub300.call.end_reason``, ``sub300.turn``, ``sub300.stage``,
``sub300.engine``, and the ledger's notes as ``sub300.note.<name>``).

`setup_tracing(config)` builds the process's `TracerProvider` with an
OTLP/HTTP exporter (protobuf) behind a `BatchSpanProcessor` when
``[telemetry].otlp_endpoint`` is set.  Export runs on the processor's own
thread: a collector that is down or slow costs the calls nothing (the SDK
logs the failed export and drops the batch; the queue is bounded).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .calls import CallContext
from .events import Event, TurnFailed, TurnFinished
from .ledger import ENGINE_STAGES, TurnLedger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from .config import Config

log = logging.getLogger(__name__)

INSTRUMENTATION = "sub300"
#: the mark where each engine's critical-path request was submitted (its queue wait starts there)
ENGINE_START_MARKS = {"stt": "stt_start", "llm": "llm_start", "tts": "tts_start"}
_NS = 1_000_000_000


def setup_tracing(config: Config) -> TracerProvider | None:
    """The process's tracer provider exporting over OTLP/HTTP, or None when ``[telemetry].otlp_endpoint`` is ''.

    The resource carries ``service.name`` (``[telemetry].service_name``) and
    ``service.version``.  Call ``provider.shutdown()`` at exit: it flushes
    the spans still queued (bounded by the exporter's timeout).
    """
    telemetry = config.telemetry
    if not telemetry.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": telemetry.service_name,
                                                        "service.version": _version()}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=telemetry.otlp_endpoint)))
    log.info("traces: OTLP/HTTP to %s as service %s", telemetry.otlp_endpoint, telemetry.service_name)
    return provider


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sub300")
    except Exception:
        return "unknown"


@dataclass
class _CallTrace:
    span: trace.Span
    offset_ns: int                      # epoch ns = clock seconds * 1e9 + offset_ns
    attributes: dict[str, Any]
    turns: set[int] = field(default_factory=set)


class TracingObserver:
    """Traces calls: `call_started` opens the call's root span, its listener adds one span tree per
    finished or failed turn, `call_ended` closes the root.

    ``tracer``: a `TracerProvider` or a `Tracer`.  ``clock``: the clock the
    calls' ledgers are on (the transports': ``time.monotonic``; a test's
    virtual loop clock), in seconds.
    """

    def __init__(self, tracer: TracerProvider | trace.Tracer, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        get_tracer = getattr(tracer, "get_tracer", None)
        self.tracer: trace.Tracer = get_tracer(INSTRUMENTATION) if get_tracer is not None else tracer  # type: ignore[assignment]
        self.clock = clock
        self.wall_ns = wall_ns
        self._calls: dict[tuple[str, str], _CallTrace] = {}

    # ------------------------------------------------------------ CallObserver
    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        now = self.clock()
        now_ns = self.wall_ns()
        offset = now_ns - int(now * _NS)
        attributes: dict[str, Any] = {"sub300.transport": transport, "sub300.call.id": call_id}
        if context is not None and context.key_id is not None:
            attributes["sub300.key.id"] = context.key_id
        span = self.tracer.start_span("call", kind=SpanKind.SERVER, start_time=now_ns, attributes=attributes)
        call = self._calls[(transport, call_id)] = _CallTrace(span, offset, attributes)
        return lambda event: self._on_event(call, event)

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        call = self._calls.pop((transport, call_id), None)
        if call is None:
            log.warning("traces: %s call %s ended but was never started", transport, call_id)
            return
        call.span.set_attribute("sub300.call.end_reason", reason)
        call.span.set_attribute("sub300.call.turns", len(call.turns))
        call.span.end(end_time=max(int(self.clock() * _NS) + call.offset_ns, _start_ns(call.span)))

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------ turns
    def _on_event(self, call: _CallTrace, event: Event) -> None:
        if isinstance(event, TurnFinished):
            self._turn(call, event.turn, event.ledger, None)
        elif isinstance(event, TurnFailed):
            self._turn(call, event.turn, event.ledger, event)

    def _turn(self, call: _CallTrace, number: int, ledger: TurnLedger | None, failed: TurnFailed | None) -> None:
        if number in call.turns:   # one span per turn, even if a late event repeats it
            return
        call.turns.add(number)
        marks = dict(ledger.marks) if ledger is not None else {}
        now = self.clock()
        ns = lambda seconds: int(seconds * _NS) + call.offset_ns  # noqa: E731
        start = marks.get("speech_start", marks.get("speech_end", min(marks.values(), default=now)))
        if "last_audio_out" in marks and failed is None:
            end = marks["last_audio_out"]
        else:
            end = max([now, *marks.values()]) if failed is not None else max(marks.values(), default=now)
        end = max(end, start)
        parent = trace.set_span_in_context(call.span)
        attributes: dict[str, Any] = {"sub300.turn": number, "sub300.transport": call.attributes["sub300.transport"],
                                      "sub300.call.id": call.attributes["sub300.call.id"]}
        if ledger is not None:
            if (v2v := ledger.voice_to_voice_ms) is not None:
                attributes["sub300.voice_to_voice_ms"] = round(v2v, 1)
            for name, value in ledger.notes.items():
                attributes[f"sub300.note.{name}"] = _attribute(value)
        turn = self.tracer.start_span("turn", context=parent, start_time=ns(start), attributes=attributes)
        if failed is not None:
            turn.set_attribute("error.type", failed.failure)
            turn.set_attribute("sub300.failure.stage", failed.stage)
            turn.set_status(Status(StatusCode.ERROR, failed.error))
        if ledger is not None:
            inside = trace.set_span_in_context(turn)
            self._stages(ledger, inside, ns)
            self._engines(ledger, inside, ns)
        turn.end(end_time=ns(end))

    def _stages(self, ledger: TurnLedger, parent: Any, ns: Callable[[float], int]) -> None:
        """The voice_to_voice span and its critical-path stages (the cursor walk of `TurnLedger.stages_ms`)."""
        marks = ledger.marks
        spans = ledger.stage_spans()
        if not spans:
            return
        v2v = self.tracer.start_span("voice_to_voice", context=parent, start_time=ns(marks["speech_end"]),
                                     attributes={"sub300.complete": "first_audio_out" in marks})
        inside = trace.set_span_in_context(v2v)
        for stage, begin, end in spans:
            self.tracer.start_span(stage, context=inside, start_time=ns(begin),
                                   attributes={"sub300.stage": stage}).end(end_time=ns(end))
        v2v.end(end_time=ns(spans[-1][2]))

    def _engines(self, ledger: TurnLedger, parent: Any, ns: Callable[[float], int]) -> None:
        """Each engine's critical-path request: its queue wait, its network time (a remote engine's), then
        its work, back to back from the request's start mark."""
        for engine in ENGINE_STAGES:
            begin = ledger.marks.get(ENGINE_START_MARKS[engine])
            if begin is None or (engine not in ledger.queue_ms and engine not in ledger.work_ms):
                continue
            for part, ms in (("queue", ledger.queue_ms.get(engine)), ("network", ledger.network_ms.get(engine)),
                             ("work", ledger.work_ms.get(engine))):
                if ms is None:
                    continue
                end = begin + ms / 1000.0
                self.tracer.start_span(f"{engine} {part}", context=parent, start_time=ns(begin),
                                       attributes={"sub300.engine": engine, "sub300.engine.part": part}
                                       ).end(end_time=ns(end))
                begin = end


def _start_ns(span: trace.Span) -> int:
    return int(getattr(span, "start_time", 0) or 0)


def _attribute(value: Any) -> Any:
    """An OpenTelemetry attribute value: str, bool, int, float kept; anything else as compact JSON."""
    if isinstance(value, (str, bool, int, float)):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)
