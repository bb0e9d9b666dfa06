"""What the caller's side reports per turn over the data channel, checked, and its place in the ledger.

The demo page (web/static/app.js) and the aiortc test caller send, once per
answered turn, after they heard its first sound::

    {"type": "ear_report", "turn": 3,
     "mouth_to_ear_ms": 871.0,          # its own measurement: end of its speech → first agent sound
     "jitter_buffer_ms": 41.2,          # mean jitter-buffer delay of the frames it played around the reply's
                                        #   onset (getStats inbound-rtp ΔjitterBufferDelay/ΔjitterBufferEmittedCount)
     "jitter_buffer_target_ms": 40.0,   # the same for jitterBufferTargetDelay
     "rtt_ms": 0.4,                     # candidate-pair currentRoundTripTime
     "playout_ms": 0.0,                 # decoded audio → where it measured, when it knows it
     "packets_lost": 0, "concealed_samples": 0}

Every field but ``type`` and ``turn`` may be missing or null.  The data
channel is the caller's to write: anything else (not JSON, not an object,
a turn that is not a positive integer, a number that is not finite or out
of range, a string where a number goes, too long a message) is a
`BadReport`, which the call logs once and ignores; the call goes on.

`apply_report` turns a report into the ledger's transport parts (agent/ledger.py):
the server's own measurements (the inbound jitter buffer and decoder, the
round-trip time from RTCP when it has one) plus the peer's (its jitter
buffer, its playout, its round-trip time otherwise).  The peer's own
mouth-to-ear is kept apart (``mouth_to_ear_reported_ms``): the estimate is
never derived from it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from sub300.agent.ledger import TurnLedger

KIND = "ear_report"
#: a report is ~300 bytes; anything much longer is not one
MAX_REPORT_BYTES = 2048
#: field → (smallest, largest) accepted; ms fields in ms, counts as counts
_MS_FIELDS = {
    "mouth_to_ear_ms": (0.0, 60_000.0),
    "jitter_buffer_ms": (0.0, 10_000.0),
    "jitter_buffer_target_ms": (0.0, 10_000.0),
    "rtt_ms": (0.0, 10_000.0),
    "playout_ms": (0.0, 10_000.0),
}
_COUNT_FIELDS = ("packets_lost", "concealed_samples")
_MAX_TURN = 1_000_000
_MAX_COUNT = 2**53


class BadReport(ValueError):
    """A data-channel report that cannot be used; the message says why, in terms of the report."""


@dataclass(frozen=True)
class EarReport:
    turn: int
    values: dict[str, float] = field(default_factory=dict)   # the numeric fields present, ms or counts

    def get(self, name: str) -> float | None:
        return self.values.get(name)


def parse_report(data: Any) -> EarReport:
    """A decoded data-channel message (``{"type": "ear_report", ...}``) → `EarReport`, or `BadReport`."""
    if not isinstance(data, dict) or data.get("type") != KIND:
        raise BadReport("not an ear_report object")
    turn = data.get("turn")
    if isinstance(turn, bool) or not isinstance(turn, int) or not 1 <= turn <= _MAX_TURN:
        raise BadReport(f"turn must be an integer 1..{_MAX_TURN}, not {_show(turn)}")
    values: dict[str, float] = {}
    for name, (low, high) in _MS_FIELDS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not low <= value <= high:
            raise BadReport(f"{name} must be a number {low:g}..{high:g} ms, not {_show(value)}")
        values[name] = float(value)
    for name in _COUNT_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value < 0 or value > _MAX_COUNT or value != int(value):
            raise BadReport(f"{name} must be a whole number >= 0, not {_show(value)}")
        values[name] = float(value)
    return EarReport(turn, values)


def parse_message(message: Any) -> dict[str, Any] | None:
    """A data-channel message → its JSON object, or None if it is not one; `BadReport` when too long."""
    if isinstance(message, bytes | bytearray):
        message = bytes(message).decode("utf-8", "replace")
    if not isinstance(message, str):
        return None
    if len(message) > MAX_REPORT_BYTES and '"ear_report"' in message[:MAX_REPORT_BYTES]:
        raise BadReport(f"ear_report of {len(message)} characters (at most {MAX_REPORT_BYTES})")
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def apply_report(ledger: TurnLedger, report: EarReport, *, inbound: tuple[float, float] | None,
                 rtt_ms: float | None, quiet_lead_ms: float | None = None, send_ms: float | None = None) -> None:
    """Record ``report`` and the server's own measurements as ``ledger``'s transport parts.

    ``inbound``: (jitter-buffer wait, decode wait) in ms of the caller's last words (media/webrtc/inbound.py);
    ``rtt_ms``: the server's own round-trip time (RTCP), else the peer's is used; ``send_ms``: the outbound
    frame's way from pull to the wire, when measured; ``quiet_lead_ms``: ``first_audio_out`` → the reply's
    first audible frame (media/webrtc/outbound.py).  Sets ``first_audio_heard`` and the reported
    mouth-to-ear; notes ``peer`` (the report's other figures) and ``rtt_source``.
    """
    rtt, source = (rtt_ms, "rtcp") if rtt_ms is not None else (report.get("rtt_ms"), "peer")
    if rtt is not None:
        ledger.record_transport("network_in", rtt / 2)
        ledger.record_transport("network_out", rtt / 2)
        ledger.notes["rtt_source"] = source
    if inbound is not None:
        ledger.record_transport("jitter_buffer_in", inbound[0])
        ledger.record_transport("decode_in", inbound[1])
    if quiet_lead_ms is not None:
        ledger.record_transport("quiet_lead", quiet_lead_ms)
    if send_ms is not None:
        ledger.record_transport("send_out", send_ms)
    for name, part in (("jitter_buffer_ms", "jitter_buffer_out"), ("playout_ms", "playout")):
        value = report.get(name)
        if value is not None:
            ledger.record_transport(part, value)
    if ledger.mouth_to_ear_reported_ms is None:
        ledger.mouth_to_ear_reported_ms = report.get("mouth_to_ear_ms")
    peer = {k: v for k, v in report.values.items() if k not in ("mouth_to_ear_ms",)}
    if peer:
        ledger.notes["peer"] = peer
    ledger.record_heard()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"
