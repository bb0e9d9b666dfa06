"""Prometheus metrics for every call, whatever its transport (WebRTC, SIP).

A CallObserver: transports report calls to it and feed its listener to their
Conversation; it turns each finished turn's ledger into histograms (the
critical-path stages, and each engine's queue wait apart from its work).
Watching the process's `Admission` (`watch`), it shows the capacity and what
remains of it (gauges for autoscalers), counts refused calls by reason, and
feeds each finished turn's queue waits to the admission's queue-wait guard.  Each
observer owns its CollectorRegistry (not prometheus-client's global one), so
a process — or a test — can build several apps side by side.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from .admission import REASONS, Admission, Refusal
from .calls import CallContext
from .events import BargeInEvent, Event, ToolCalled, TransportStats, TurnDiscarded, TurnFailed, TurnFinished, TurnHeard
from .ledger import ENGINE_STAGES, STAGES, TRANSPORT_PARTS

if TYPE_CHECKING:
    from .engines import Engines

log = logging.getLogger(__name__)

#: seconds; dense around the 300 ms budget, wide enough for a slow CPU turn
_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: seconds; an engine queue wait is often 0 or a few ms when the engine is free
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, *_BUCKETS)
#: real-time factor (compute seconds per audio second): < 1 keeps up with real time
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
#: engines whose real-time factor a turn's ledger notes give: engine → (compute ms note, audio s note)
RTF_NOTES = {"stt": ("stt_inference_ms", "stt_audio_s"), "tts": ("tts_synthesis_ms", "tts_audio_s")}
CONTENT_TYPE = CONTENT_TYPE_LATEST


class MetricsObserver:
    def __init__(self, budget_ms: float, registry: CollectorRegistry | None = None,
                 admission: Admission | None = None) -> None:
        self.budget_s = budget_ms / 1000.0
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.calls_active = Gauge("sub300_calls_active", "Calls in progress", ["transport"], registry=r)
        self.calls = Counter("sub300_calls", "Calls started", ["transport"], registry=r)
        self.calls_ended = Counter("sub300_calls_ended", "Calls ended, by reason", ["transport", "reason"], registry=r)
        self.turns = Counter("sub300_turns", "Caller turns, by outcome (answered, discarded, failed)",
                             ["transport", "outcome"], registry=r)
        self.llm_errors = Counter("sub300_llm_errors", "Turns whose LLM answer failed, by kind of failure "
                                  "(dropped, timeout, http_5xx, http_4xx, stream_error, malformed, empty, ...)",
                                  ["transport", "kind"], registry=r)
        self.turns_within_budget = Counter("sub300_turns_within_budget",
                                           "Answered turns whose voice-to-voice was within the budget",
                                           ["transport"], registry=r)
        self.goodput = Gauge("sub300_goodput_ratio",
                             "Share of answered turns within the budget since start (NaN before the first)",
                             registry=r)
        self.budget = Gauge("sub300_budget_seconds", "The voice-to-voice budget", registry=r)
        self.budget.set(self.budget_s)
        self.voice_to_voice = Histogram("sub300_voice_to_voice_seconds",
                                        "Caller's true end of speech to the agent's first audio out",
                                        ["transport"], buckets=_BUCKETS, registry=r)
        self.stage = Histogram("sub300_stage_seconds", "Critical-path stage durations (sum to voice-to-voice)",
                               ["transport", "stage"], buckets=_BUCKETS, registry=r)
        self.queue_wait = Histogram("sub300_queue_wait_seconds",
                                    "A turn's critical-path engine request: submitted to its work started",
                                    ["transport", "engine"], buckets=_QUEUE_BUCKETS, registry=r)
        self.engine_work = Histogram("sub300_engine_work_seconds",
                                     "A turn's critical-path engine request: its work (STT: the final transcript, "
                                     "LLM: to the first token, TTS: to the first piece's audio)",
                                     ["transport", "engine"], buckets=_QUEUE_BUCKETS, registry=r)
        self.engine_network = Histogram(
            "sub300_engine_network_seconds", "A turn's critical-path request to a remote engine: its time on the "
            "network (request sent to the answer's first byte, less the endpoint's own queue and work as its "
            "Server-Timing says; only endpoints that send it)", ["transport", "stage"], buckets=_QUEUE_BUCKETS,
            registry=r)
        self.mouth_to_ear_estimate = Histogram(
            "sub300_mouth_to_ear_estimate_seconds",
            "The server's estimate of the caller's mouth-to-ear: inbound transport + voice-to-voice + outbound "
            "transport (WebRTC turns whose caller reported its side)", ["transport"], buckets=_BUCKETS, registry=r)
        self.mouth_to_ear_reported = Histogram(
            "sub300_mouth_to_ear_reported_seconds",
            "Mouth-to-ear as the caller's side measured and reported it", ["transport"], buckets=_BUCKETS,
            registry=r)
        self.transport_part = Histogram(
            "sub300_transport_seconds", "The transport's parts of mouth-to-ear outside voice-to-voice "
            "(network, jitter buffers, decoding, playout)", ["transport", "part"], buckets=_QUEUE_BUCKETS,
            registry=r)
        # what was only in memory before: packets, barge-ins, wasted speculation, failures, engine speed
        self.rtp_packets_received = Counter(
            "sub300_rtp_packets_received", "RTP packets of the caller's audio received (SIP, counted at the "
            "call's end)", ["transport", "direction"], registry=r)
        self.rtp_packets_lost = Counter(
            "sub300_rtp_packets_lost", "RTP packets lost: from_caller (SIP: given up by the reorder buffer, at "
            "the call's end), to_caller (WebRTC: the caller's side's packetsLost, from its ear reports)",
            ["transport", "direction"], registry=r)
        self.barge_ins = Counter("sub300_barge_ins", "Caller voice while the agent spoke, by outcome (paused at "
                                 "once, then interrupted or resumed)", ["transport", "outcome"], registry=r)
        self.barge_in_reaction = Histogram(
            "sub300_barge_in_reaction_seconds", "Caller's voice onset to the agent silent, by outcome",
            ["transport", "outcome"], buckets=_QUEUE_BUCKETS, registry=r)
        self.speculations_wasted = Counter(
            "sub300_speculations_wasted", "Speculative replies started on an early final and thrown away (the "
            "caller went on)", ["transport"], registry=r)
        self.turn_failures = Counter(
            "sub300_turn_failures", "Turns failed, by the stage that failed (stt, llm, tts, internal) and the "
            "failure's kind", ["transport", "stage", "kind"], registry=r)
        self.engine_compute = Counter(
            "sub300_engine_compute_seconds", "Engine compute time of the audio it handled (STT: inference of "
            "the final transcriptions; TTS: synthesis of the replies)", ["transport", "engine"], registry=r)
        self.engine_audio = Counter(
            "sub300_engine_audio_seconds", "Audio the engine handled in that time (STT: heard, TTS: made)",
            ["transport", "engine"], registry=r)
        self.real_time_factor = Histogram(
            "sub300_real_time_factor_ratio", "Per turn: engine compute seconds / audio seconds (STT: the final "
            "transcription; TTS: the reply's synthesis)", ["transport", "engine"], buckets=_RTF_BUCKETS, registry=r)
        self.tool_calls = Counter(
            "sub300_tool_calls", "Tool calls the model asked for, by tool and outcome (ok, error, timeout, "
            "invalid_arguments, unknown_tool, cancelled)", ["transport", "tool", "outcome"], registry=r)
        self.tool_duration = Histogram(
            "sub300_tool_duration_seconds", "A tool call's wall time, by tool (cancelled calls included)",
            ["transport", "tool"], buckets=_QUEUE_BUCKETS, registry=r)
        self.rtp_packets_received.labels("sip", "from_caller")
        self.rtp_packets_lost.labels("sip", "from_caller")
        self.rtp_packets_lost.labels("webrtc", "to_caller")
        ProcessCollector(registry=r)     # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)    # python_info
        self.admission: Admission | None = None
        self._answered = 0
        self._within = 0
        self.goodput.set(float("nan"))
        # Pre-create the labelled series so /metrics shows them before the first call.
        for transport in ("webrtc", "sip", "twilio", "pcm"):   # twilio, pcm: web/websocket.py
            self.calls_active.labels(transport)
            for stage, _ in STAGES:
                self.stage.labels(transport, stage)
            for engine in ENGINE_STAGES:
                self.queue_wait.labels(transport, engine)
                self.engine_work.labels(transport, engine)
            self.calls.labels(transport)
            for outcome in ("answered", "discarded", "failed"):
                self.turns.labels(transport, outcome)
            self.turns_within_budget.labels(transport)
            self.voice_to_voice.labels(transport)
            self.speculations_wasted.labels(transport)
            for outcome in ("paused", "interrupted", "resumed"):
                self.barge_ins.labels(transport, outcome)
            for engine in RTF_NOTES:
                self.engine_compute.labels(transport, engine)
                self.engine_audio.labels(transport, engine)
        if admission is not None:
            self.watch(admission)

    def watch_engines(self, engines: Engines) -> None:
        """Requests waiting in each shared engine's queue, read at each scrape (engines that have a queue)."""
        if getattr(self, "_engines_watched", False):
            return
        self._engines_watched = True
        waiting = Gauge("sub300_engine_waiting_requests",
                        "Requests queued for a shared engine, all calls together (not yet at work)",
                        ["engine"], registry=self.registry)
        def reader(engine: object) -> Callable[[], float]:
            return lambda: float(getattr(engine, "waiting", 0))

        for stage, engine in (("stt", engines.stt), ("llm", engines.llm), ("tts", engines.tts)):
            if hasattr(engine, "waiting"):
                waiting.labels(stage).set_function(reader(engine))
        remote = {stage: endpoint for stage, engine in (("stt", engines.stt), ("llm", engines.llm), ("tts", engines.tts))
                  if hasattr(endpoint := getattr(engine, "endpoint", None), "urgency_updates_sent")}
        if remote:
            self.registry.register(_UrgencyUpdates(remote))

    def watch(self, admission: Admission) -> None:
        """Show ``admission``'s capacity and remaining calls (read at each scrape), count its refusals,
        and feed it each finished turn's queue waits (its queue-wait guard)."""
        if self.admission is not None:
            raise ValueError("this metrics observer already watches an admission")
        self.admission = admission
        r = self.registry
        self.capacity = Gauge("sub300_capacity_calls", "Calls the process admits at once (admission)", registry=r)
        self.capacity_remaining = Gauge("sub300_capacity_remaining_calls",
                                        "New calls that would be admitted now (0 when full or saturated)",
                                        registry=r)
        self.calls_refused = Counter("sub300_calls_refused", "Calls refused by admission, by reason "
                                     "(full, transport_full, saturated)", ["transport", "reason"], registry=r)
        self.guard_p95 = Gauge("sub300_admission_queue_wait_p95_seconds",
                               "p95 of recent turns' summed engine queue wait, as the admission's guard sees it "
                               "(NaN: no recent turn)", registry=r)
        self.capacity.set_function(lambda: admission.capacity.calls)
        self.capacity_remaining.set_function(admission.remaining_calls)
        self.guard_p95.set_function(lambda: _seconds(admission.queue_wait_p95_ms()))
        admission.on_refusal.append(self._refused)
        for transport in ("webrtc", "sip"):
            for reason in REASONS:
                self.calls_refused.labels(transport, reason)

    def _refused(self, transport: str, refusal: Refusal) -> None:
        self.calls_refused.labels(transport, refusal.reason).inc()

    # ------------------------------------------------------------ CallObserver
    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        log.info("%s call %s started", transport, call_id)
        self.calls.labels(transport).inc()
        self.calls_active.labels(transport).inc()
        lost_to_caller = [0]   # the caller's side reports its packetsLost as a running total: count the growth

        def listen(event: Event) -> None:
            if isinstance(event, TurnHeard):
                peer = event.ledger.notes.get("peer")
                lost = peer.get("packets_lost") if isinstance(peer, dict) else None
                if isinstance(lost, (int, float)) and lost > lost_to_caller[0]:
                    self.rtp_packets_lost.labels(transport, "to_caller").inc(lost - lost_to_caller[0])
                    lost_to_caller[0] = int(lost)
            self._on_event(transport, event)

        return listen

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        log.info("%s call %s ended: %s", transport, call_id, reason)
        self.calls_active.labels(transport).dec()
        self.calls_ended.labels(transport, _reason_label(reason)).inc()

    # ------------------------------------------------------------ turns
    def _on_event(self, transport: str, event: Event) -> None:
        ledger_of = getattr(event, "ledger", None)
        if isinstance(event, (TurnDiscarded, TurnFailed, TurnFinished)) and ledger_of is not None:
            self._notes(transport, ledger_of.notes)
        if isinstance(event, BargeInEvent):
            outcome = _label(event.outcome)
            self.barge_ins.labels(transport, outcome).inc()
            if event.reaction_ms is not None:
                self.barge_in_reaction.labels(transport, outcome).observe(event.reaction_ms / 1000.0)
        elif isinstance(event, ToolCalled):
            tool = _label(event.name)
            self.tool_calls.labels(transport, tool, _label(event.outcome)).inc()
            self.tool_duration.labels(transport, tool).observe(max(0.0, event.duration_ms / 1000.0))
        elif isinstance(event, TransportStats):
            direction = _label(event.direction)
            if event.packets_received is not None:
                self.rtp_packets_received.labels(transport, direction).inc(max(0, event.packets_received))
            self.rtp_packets_lost.labels(transport, direction).inc(max(0, event.packets_lost))
        elif isinstance(event, TurnDiscarded):
            self.turns.labels(transport, "discarded").inc()
        elif isinstance(event, TurnFailed):
            self.turns.labels(transport, "failed").inc()
            self.turn_failures.labels(transport, _label(event.stage), _label(event.failure)).inc()
            if event.stage == "llm":
                self.llm_errors.labels(transport, _label(event.failure)).inc()
        elif isinstance(event, TurnHeard):
            heard = event.ledger
            for part, ms in heard.transport_ms.items():
                if part in TRANSPORT_PARTS:
                    self.transport_part.labels(transport, part).observe(ms / 1000.0)
            if (estimate := heard.mouth_to_ear_estimate_ms) is not None:
                self.mouth_to_ear_estimate.labels(transport).observe(estimate / 1000.0)
            if (reported := heard.mouth_to_ear_reported_ms) is not None:
                self.mouth_to_ear_reported.labels(transport).observe(reported / 1000.0)
        elif isinstance(event, TurnFinished):
            self.turns.labels(transport, "answered").inc()
            ledger = event.ledger
            for stage, ms in ledger.stages_ms().items():
                self.stage.labels(transport, stage).observe(ms / 1000.0)
            for engine, ms in ledger.queue_ms.items():
                self.queue_wait.labels(transport, engine).observe(ms / 1000.0)
            for engine, ms in ledger.work_ms.items():
                self.engine_work.labels(transport, engine).observe(ms / 1000.0)
            for stage, ms in ledger.network_ms.items():
                self.engine_network.labels(transport, stage).observe(ms / 1000.0)
            if self.admission is not None:
                self.admission.record_turn(ledger.queue_ms)
            v2v = ledger.voice_to_voice_ms
            if v2v is None:
                return
            self.voice_to_voice.labels(transport).observe(v2v / 1000.0)
            self._answered += 1
            if v2v / 1000.0 <= self.budget_s:
                self._within += 1
                self.turns_within_budget.labels(transport).inc()
            self.goodput.set(self._within / self._answered)

    def _notes(self, transport: str, notes: dict) -> None:
        """A finished, failed or discarded turn's ledger notes: wasted speculation, engine real-time factors."""
        wasted = notes.get("speculation_wasted")
        if isinstance(wasted, (int, float)) and wasted > 0:
            self.speculations_wasted.labels(transport).inc(wasted)
        for engine, (compute_note, audio_note) in RTF_NOTES.items():
            compute_ms, audio_s = notes.get(compute_note), notes.get(audio_note)
            if isinstance(compute_ms, (int, float)) and isinstance(audio_s, (int, float)) and audio_s > 0:
                self.engine_compute.labels(transport, engine).inc(max(0.0, compute_ms / 1000.0))
                self.engine_audio.labels(transport, engine).inc(audio_s)
                self.real_time_factor.labels(transport, engine).observe(max(0.0, compute_ms / 1000.0) / audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def active_calls(self, transport: str | None = None) -> int:
        samples = next(iter(self.calls_active.collect())).samples
        return int(sum(s.value for s in samples if transport is None or s.labels["transport"] == transport))


class _UrgencyUpdates:
    """``sub300_remote_urgency_updates_total{stage,result}``: urgency changes a remote engine posted to its
    endpoint (models/remote.py: ``sent`` accepted, ``failed`` logged and not delivered), read at each scrape."""

    def __init__(self, endpoints: dict[str, object]) -> None:
        self._endpoints = endpoints

    def collect(self):
        family = CounterMetricFamily(
            "sub300_remote_urgency_updates", "Urgency changes posted to a remote engine's endpoint "
            "(POST /v1/requests/{id}/urgency), by result: sent (accepted) | failed (logged, not delivered)",
            labels=["stage", "result"])
        for stage, endpoint in self._endpoints.items():
            family.add_metric([stage, "sent"], float(getattr(endpoint, "urgency_updates_sent", 0)))
            family.add_metric([stage, "failed"], float(getattr(endpoint, "urgency_updates_failed", 0)))
        yield family


def _seconds(ms: float | None) -> float:
    return float("nan") if ms is None else ms / 1000.0


def _label(word: str) -> str:
    """A label value from a failure kind: short, lower case, never free text."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in word.lower())[:32] or "unknown"


def _reason_label(reason: str) -> str:
    """Free-text reasons would explode the label set: keep the first word ("hangup", "ice", …)."""
    word = reason.split(":", 1)[0].split()[0] if reason.strip() else "unknown"
    return word.lower()[:32]
