"""The Prometheus series of issue 12 (agent/metrics.py): names with units and ``_total``, the process
collector, and counters for what was only in memory (RTP loss, barge-ins, wasted speculation, failures,
engine real-time factors), fed by events as a transport and a conversation emit them."""
from __future__ import annotations

import copy

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sub300.agent.calls import ObserverGroup
from sub300.agent.events import BargeInEvent, TransportStats, TurnFailed, TurnFinished, TurnHeard
from sub300.agent.ledger import TurnLedger
from sub300.agent.metrics import MetricsObserver


def samples(observer: MetricsObserver) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition: (name, labels) → value, parsed as Prometheus would."""
    out = {}
    for family in text_string_to_metric_families(observer.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(observer: MetricsObserver, name: str, **labels) -> float:
    return samples(observer)[(name, frozenset(labels.items()))]


def test_names_carry_units_and_counters_end_in_total():
    names = {name for name, _ in samples(MetricsObserver(300))}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
            "sub300_calls_total", "sub300_turns_total", "sub300_rtp_packets_lost_total",
            "sub300_barge_ins_total", "sub300_speculations_wasted_total", "sub300_engine_compute_seconds_total",
            "sub300_voice_to_voice_seconds_bucket", "sub300_stage_seconds_bucket"} <= names
    families = text_string_to_metric_families(MetricsObserver(300).render().decode())
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name


def test_events_become_counters_and_histograms():
    observer = MetricsObserver(300)
    listen = observer.call_started("sip", "c1")
    listen(BargeInEvent("paused", None))
    listen(BargeInEvent("interrupted", 180.0))
    ledger = TurnLedger(1, notes={"speculation_wasted": 2, "stt_inference_ms": 50.0, "stt_audio_s": 1.0,
                                  "tts_synthesis_ms": 300.0, "tts_audio_s": 2.0})
    listen(TurnFinished(1, "hi", "hello", ledger))
    listen(TurnFailed(2, "TTS down", stage="tts", failure="timeout", ledger=TurnLedger(2)))
    listen(TransportStats(packets_received=500, packets_lost=7))
    observer.call_ended("sip", "c1", "hangup")
    assert value(observer, "sub300_barge_ins_total", transport="sip", outcome="paused") == 1
    assert value(observer, "sub300_barge_in_reaction_seconds_sum", transport="sip", outcome="interrupted") == 0.18
    assert value(observer, "sub300_speculations_wasted_total", transport="sip") == 2
    assert value(observer, "sub300_turn_failures_total", transport="sip", stage="tts", kind="timeout") == 1
    assert value(observer, "sub300_rtp_packets_received_total", transport="sip", direction="from_caller") == 500
    assert value(observer, "sub300_rtp_packets_lost_total", transport="sip", direction="from_caller") == 7
    assert value(observer, "sub300_engine_compute_seconds_total", transport="sip", engine="tts") == 0.3
    assert value(observer, "sub300_engine_audio_seconds_total", transport="sip", engine="tts") == 2.0
    assert value(observer, "sub300_real_time_factor_ratio_sum", transport="sip", engine="stt") == 0.05
    assert value(observer, "sub300_real_time_factor_ratio_bucket", transport="sip", engine="tts", le="0.2") == 1


def test_webrtc_packets_lost_count_the_growth_of_the_callers_running_total():
    observer = MetricsObserver(300)
    listen = observer.call_started("webrtc", "c2")
    for turn, lost in ((1, 3), (2, 3), (3, 5)):
        listen(TurnHeard(turn, TurnLedger(turn, notes={"peer": {"packets_lost": lost}})))
    assert value(observer, "sub300_rtp_packets_lost_total", transport="webrtc", direction="to_caller") == 5


def test_a_fake_call_notes_both_engines_real_time_factors(config):
    pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
    from sub300.testing.clock import loop_clock, run_virtual
    from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
    from sub300.testing.scripted_caller import ScriptedCaller

    observer = MetricsObserver(300)

    async def call():
        c = copy.deepcopy(config)
        engines = fake_engines(stt=FakeStt("Hello there.", delay_s=0.1), llm=FakeLlm(["Hi", "."]),
                               tts=FakeTts(delay_s=0.05, ms_per_piece=500.0))
        caller = ScriptedCaller(engines, c, clock=loop_clock())
        caller.conversation.listeners.append(observer.call_started("webrtc", "c3"))
        try:
            await caller.silence(0.5)
            await caller.say(speech(1.0))
            await caller.until_idle()
        finally:
            await caller.close()
        return caller

    caller = run_virtual(call())
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    notes = turn.ledger.notes
    assert notes["tts_synthesis_ms"] == pytest.approx(50.0, abs=0.5) and notes["tts_audio_s"] == pytest.approx(0.5)
    assert value(observer, "sub300_real_time_factor_ratio_count", transport="webrtc", engine="tts") == 1
    assert value(observer, "sub300_real_time_factor_ratio_sum", transport="webrtc", engine="tts") == \
        pytest.approx(0.1, abs=0.002)
    assert value(observer, "sub300_real_time_factor_ratio_count", transport="webrtc", engine="stt") == 1


async def test_a_sip_call_reports_its_rtp_packets_at_its_end(config):
    """The SIP service emits `TransportStats` before `call_ended`: packets received, and those the reorder
    buffer gave up waiting for (one missing sequence number here)."""
    import asyncio
    import re
    import socket
    import struct

    from .test_sip_protocol import Client, call, hang_up
    from .test_sip_support import echo_calls, sip_service

    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    try:
        async with sip_service(config, call_factory=echo_calls) as (service, observer):
            metrics = MetricsObserver(300)
            service.uas.observer = ObserverGroup([observer, metrics])
            client = await Client.open(service.address)
            ok = await call(client, rtp_port=rtp.getsockname()[1])
            port = int(re.search(r"m=audio (\d+)", ok).group(1))   # type: ignore[union-attr]
            for seq in (*range(1, 4), *range(5, 12)):              # 4 never comes
                rtp.sendto(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x1234) + bytes([0xFF]) * 160,
                           ("127.0.0.1", port))
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.05)
            await hang_up(client, ok)
            client.close()
            (ended,) = await observer.wait_ended()
    finally:
        rtp.close()
    (stats,) = [e for e in ended.events if isinstance(e, TransportStats)]
    assert (stats.packets_received, stats.packets_lost, stats.direction) == (10, 1, "from_caller")
    assert value(metrics, "sub300_rtp_packets_received_total", transport="sip", direction="from_caller") == 10
    assert value(metrics, "sub300_rtp_packets_lost_total", transport="sip", direction="from_caller") == 1

