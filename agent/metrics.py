"""Prometheus metrics for every call, whatever its transport (WebRTC, SIP).

A CallObserver: transports report calls to it and feed its listener to their
Conversation; it turns each finished turn's ledger into histograms.  Each
observer owns its CollectorRegistry (not prometheus-client's global one), so
a process — or a test — can build several apps side by side.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .events import Event, TurnDiscarded, TurnFailed, TurnFinished
from .ledger import STAGES

log = logging.getLogger(__name__)

#: seconds; dense around the 300 ms budget, wide enough for a slow CPU turn
_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class MetricsObserver:
    def __init__(self, budget_ms: float, registry: CollectorRegistry | None = None) -> None:
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
        self._answered = 0
        self._within = 0
        self.goodput.set(float("nan"))
        # Pre-create the labelled series so /metrics shows them before the first call.
        for transport in ("webrtc", "sip"):
            self.calls_active.labels(transport)
            for stage, _ in STAGES:
                self.stage.labels(transport, stage)

    # ------------------------------------------------------------ CallObserver
    def call_started(self, transport: str, call_id: str) -> Callable[[Event], None]:
        log.info("%s call %s started", transport, call_id)
        self.calls.labels(transport).inc()
        self.calls_active.labels(transport).inc()
        return lambda event: self._on_event(transport, event)

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        log.info("%s call %s ended: %s", transport, call_id, reason)
        self.calls_active.labels(transport).dec()
        self.calls_ended.labels(transport, _reason_label(reason)).inc()

    # ------------------------------------------------------------ turns
    def _on_event(self, transport: str, event: Event) -> None:
        if isinstance(event, TurnDiscarded):
            self.turns.labels(transport, "discarded").inc()
        elif isinstance(event, TurnFailed):
            self.turns.labels(transport, "failed").inc()
            if event.stage == "llm":
                self.llm_errors.labels(transport, _label(event.failure)).inc()
        elif isinstance(event, TurnFinished):
            self.turns.labels(transport, "answered").inc()
            ledger = event.ledger
            for stage, ms in ledger.stages_ms().items():
                self.stage.labels(transport, stage).observe(ms / 1000.0)
            v2v = ledger.voice_to_voice_ms
            if v2v is None:
                return
            self.voice_to_voice.labels(transport).observe(v2v / 1000.0)
            self._answered += 1
            if v2v / 1000.0 <= self.budget_s:
                self._within += 1
                self.turns_within_budget.labels(transport).inc()
            self.goodput.set(self._within / self._answered)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def active_calls(self, transport: str | None = None) -> int:
        samples = next(iter(self.calls_active.collect())).samples
        return int(sum(s.value for s in samples if transport is None or s.labels["transport"] == transport))


def _label(word: str) -> str:
    """A label value from a failure kind: short, lower case, never free text."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in word.lower())[:32] or "unknown"


def _reason_label(reason: str) -> str:
    """Free-text reasons would explode the label set: keep the first word ("hangup", "ice", …)."""
    word = reason.split(":", 1)[0].split()[0] if reason.strip() else "unknown"
    return word.lower()[:32]
