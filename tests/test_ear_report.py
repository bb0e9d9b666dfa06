"""To the caller's ear, fast: the ledger's transport parts and estimate, the data-channel report's parsing
(malformed and hostile input included), the measured jitter buffer, and a call that gets reports."""
from __future__ import annotations

import json
import logging

import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from sub300.agent.events import TurnFinished
from sub300.agent.ledger import TurnLedger
from sub300.agent.metrics import MetricsObserver
from sub300.media.webrtc.ear_report import BadReport, apply_report, parse_message, parse_report
from sub300.media.webrtc.inbound import InboundTimings
from sub300.media.webrtc.jitter import MeasuredJitterBuffer


def answered(v2v_s: float = 0.8) -> TurnLedger:
    ledger = TurnLedger(3)
    ledger.mark("speech_end", 10.0)
    ledger.mark("first_audio_out", 10.0 + v2v_s)
    return ledger


def test_estimate_is_inbound_plus_voice_to_voice_plus_outbound_and_marks_the_ear():
    ledger = answered()
    assert ledger.mouth_to_ear_estimate_ms is None        # nothing from the peer yet
    for part, ms in (("network_in", 1.0), ("jitter_buffer_in", 20.0), ("decode_in", 2.0),
                     ("network_out", 1.0), ("jitter_buffer_out", 40.0), ("playout", 6.0)):
        ledger.record_transport(part, ms)
    ledger.record_heard()
    assert ledger.mouth_to_ear_estimate_ms == pytest.approx(23.0 + 800.0 + 47.0)
    assert ledger.marks["first_audio_heard"] == pytest.approx(10.847)
    doc = ledger.to_dict()
    assert doc["marks_ms"]["first_audio_heard"] == pytest.approx(847.0)
    assert doc["mouth_to_ear_estimate_ms"] == pytest.approx(870.0) and doc["voice_to_voice_ms"] == 800.0
    again = TurnLedger.from_dict(doc)
    assert again.transport_ms == ledger.transport_ms and again.mouth_to_ear_estimate_ms == pytest.approx(870.0)
    assert "mouth_to_ear" in ledger.format_table()


def test_transport_parts_refuse_unknown_names_and_impossible_values():
    ledger = answered()
    with pytest.raises(KeyError):
        ledger.record_transport("wormhole", 1.0)
    for bad in (-1.0, float("nan"), float("inf"), 1e9):
        with pytest.raises(ValueError):
            ledger.record_transport("network_in", bad)
    ledger.record_transport("network_in", 3.0)
    ledger.record_transport("network_in", 9.0)            # first write wins
    assert ledger.transport_ms == {"network_in": 3.0}


def test_a_report_fills_the_ledger_with_the_servers_own_measurements_first():
    ledger = answered()
    report = parse_report({"type": "ear_report", "turn": 3, "mouth_to_ear_ms": 905.5, "jitter_buffer_ms": 41.0,
                           "rtt_ms": 8.0, "packets_lost": 2, "concealed_samples": 480})
    apply_report(ledger, report, inbound=(20.0, 1.5), rtt_ms=2.0)
    assert ledger.transport_ms == {"network_in": 1.0, "network_out": 1.0, "jitter_buffer_in": 20.0,
                                   "decode_in": 1.5, "jitter_buffer_out": 41.0}
    assert ledger.notes["rtt_source"] == "rtcp"          # the server's RTCP round trip, not the peer's
    assert ledger.mouth_to_ear_reported_ms == 905.5         # kept apart, never mixed into the estimate
    assert ledger.mouth_to_ear_estimate_ms == pytest.approx(22.5 + 800.0 + 42.0)
    assert ledger.notes["peer"]["packets_lost"] == 2
    other = answered()
    apply_report(other, report, inbound=None, rtt_ms=None)
    assert other.transport_ms["network_out"] == 4.0 and other.notes["rtt_source"] == "peer"


@pytest.mark.parametrize("data, why", [
    ([], "not an ear_report"),
    ({"type": "ear_report"}, "turn"),
    ({"type": "ear_report", "turn": "3"}, "turn"),
    ({"type": "ear_report", "turn": True}, "turn"),
    ({"type": "ear_report", "turn": 0}, "turn"),
    ({"type": "ear_report", "turn": 10**12}, "turn"),
    ({"type": "ear_report", "turn": 1, "mouth_to_ear_ms": "fast"}, "mouth_to_ear_ms"),
    ({"type": "ear_report", "turn": 1, "mouth_to_ear_ms": -5}, "mouth_to_ear_ms"),
    ({"type": "ear_report", "turn": 1, "jitter_buffer_ms": float("nan")}, "jitter_buffer_ms"),
    ({"type": "ear_report", "turn": 1, "rtt_ms": 1e300}, "rtt_ms"),
    ({"type": "ear_report", "turn": 1, "rtt_ms": [1]}, "rtt_ms"),
    ({"type": "ear_report", "turn": 1, "packets_lost": 1.5}, "packets_lost"),
    ({"type": "ear_report", "turn": 1, "concealed_samples": -1}, "concealed_samples"),
])
def test_malformed_reports_are_refused_saying_why(data, why):
    with pytest.raises(BadReport, match=why):
        parse_report(data)


def test_messages_that_are_not_json_objects_are_skipped_and_huge_reports_refused():
    assert parse_message("not json") is None and parse_message("[1, 2]") is None and parse_message(None) is None
    assert parse_message(b'{"type": "hangup"}') == {"type": "hangup"}
    with pytest.raises(BadReport, match="characters"):
        parse_message('{"type": "ear_report", "turn": 1, "pad": "' + "x" * 5000 + '"}')
    report = parse_report({"type": "ear_report", "turn": 2, "mouth_to_ear_ms": None, "extra": {"a": 1}})
    assert report.turn == 2 and report.values == {}    # unknown fields ignored, nulls are missing


def _packet(seq: int, ts: int) -> RtpPacket:
    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts)
    packet._data = b"x"  # type: ignore[attr-defined]
    return packet


@pytest.mark.parametrize("prefetch, released_after", [(4, 4), (1, 1), (0, 0)])
def test_the_jitter_buffer_releases_after_its_prefetch_and_stamps_each_frame(prefetch, released_after):
    now = [0.0]
    buffer = MeasuredJitterBuffer(prefetch=prefetch, clock=lambda: now[0])
    released = []
    for n in range(8):
        now[0] = n * 0.020
        _, frame = buffer.add(_packet(100 + n, 5000 + 960 * n))
        if frame is not None:
            released.append((n, frame.timestamp))
    first_arrival, first_release = buffer.taken(0)        # the first frame, by its mapped RTP timestamp
    assert released[0] == (released_after, 5000)
    assert (first_release - first_arrival) * 1000 == pytest.approx(20.0 * released_after)
    assert buffer.taken(0) is None                         # taken once


def test_prefetch_zero_drops_a_packet_older_than_one_released():
    buffer = MeasuredJitterBuffer(prefetch=0, clock=lambda: 0.0)
    assert buffer.add(_packet(10, 0))[1] is not None
    assert buffer.add(_packet(12, 1920))[1] is not None   # 11 lost or late: go on
    assert buffer.add(_packet(11, 960))[1] is None         # late: the decoder needs order
    assert buffer.dropped_late == 1


def test_inbound_timings_take_the_median_around_a_moment():
    timings = InboundTimings()
    for n, wait in enumerate((20.0, 20.0, 80.0, 20.0)):
        read = 5.0 + n * 0.02
        timings.add(read, read - 0.001 - wait / 1000, read - 0.001)
    buffered, decoding = timings.around(5.06)
    assert buffered == pytest.approx(20.0) and decoding == pytest.approx(1.0)
    assert timings.around(100.0) is None


async def test_a_call_records_reports_and_logs_and_ignores_bad_ones(config, caplog):
    from sub300.media.webrtc.call import WebRtcCall
    from sub300.testing.fakes import fake_engines

    metrics = MetricsObserver(config.budget_ms)
    heard: list = []
    call = WebRtcCall("c1", RTCPeerConnection(), fake_engines(), config, metrics)
    call._send = lambda payload: heard.append(payload)   # no data channel here
    call.rtt_ms = 1.0
    with caplog.at_level(logging.WARNING):
        for bad in ('{"type": "ear_report", "turn": -1}', '{"type": "ear_report", "turn": 1, "rtt_ms": "x"}'):
            call._on_message(bad)
    assert call.bad_reports == 2 and "ignored a bad ear_report" in caplog.text and not call.closed
    # the report comes while the reply plays; the turn's ledger comes when it finishes
    call._on_message(json.dumps({"type": "ear_report", "turn": 3, "mouth_to_ear_ms": 900.0,
                                 "jitter_buffer_ms": 40.0}))
    ledger = answered()
    call._on_event(TurnFinished(3, "hi", "hello", ledger))
    assert [p["kind"] for p in heard if p["kind"] == "turn_heard"] == ["turn_heard"]
    assert ledger.mouth_to_ear_reported_ms == 900.0 and ledger.has("first_audio_heard")
    assert ledger.mouth_to_ear_estimate_ms == pytest.approx(0.5 + 800.0 + 0.5 + 40.0)
    call._on_message(json.dumps({"type": "ear_report", "turn": 3, "mouth_to_ear_ms": 1.0}))
    assert call.bad_reports == 3 and ledger.mouth_to_ear_reported_ms == 900.0   # a second report is refused
    text = metrics.render().decode()
    assert 'sub300_mouth_to_ear_estimate_seconds_count{transport="webrtc"} 1.0' in text
    assert 'sub300_mouth_to_ear_reported_seconds_sum{transport="webrtc"} 0.9' in text
    # reports for turns that never finish (discarded) cannot block later ones: the oldest waiting goes
    for turn in range(10, 20):
        call._on_message(json.dumps({"type": "ear_report", "turn": turn, "mouth_to_ear_ms": 700.0}))
    assert sorted(call._reports) == list(range(12, 20)) and call.bad_reports == 3
    await call.close("test")
    assert call.closed
