"""Admission (agent/admission.py): one capacity for every transport, the queue-wait guard, the capacity's sources,
its configuration, metrics, /readyz, and the refusals on both transports (HTTP 503 on /offer, SIP 503).

Pure logic on a hand-moved clock; the web and SIP tests use the named fake engines or the echo agent (no model).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from sub300.agent.admission import GUESSED_CAPACITY, Admission, Capacity, Refusal, Ticket, percentile
from sub300.agent.config import Config, ConfigError, load_config, override
from sub300.agent.events import TurnFinished
from sub300.agent.ledger import TurnLedger
from sub300.agent.metrics import MetricsObserver
from sub300.testing.fakes import fake_engines
from sub300.web.server import SIGNALLING_KEY, build_app

from .test_sip_protocol import Client, call, hang_up, header, invite
from .test_sip_support import echo_calls, sip_service
from .test_webrtc_offers import body, seed_offer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guarded(clock: Clock, calls: int = 10, **kw) -> Admission:
    settings = {"max_queue_wait_ms": 200.0, "window_turns": 10, "window_s": 30.0, "min_turns": 3,
                "retry_after_s": 7, **kw}
    return Admission(Capacity(calls, "test"), clock=clock, **settings)


# ------------------------------------------------------------ capacity
def test_capacity_is_shared_by_transports_and_a_slot_is_released_once():
    admission = Admission(Capacity(3, "test"), transport_caps={"webrtc": 2, "sip": 3}, retry_after_s=9)
    web1, sip1 = admission.try_admit("webrtc"), admission.try_admit("sip")
    assert isinstance(web1, Ticket) and isinstance(sip1, Ticket)
    web2 = admission.try_admit("webrtc")
    assert isinstance(web2, Ticket) and admission.active_calls() == 3 and admission.remaining_calls() == 0
    refused = admission.try_admit("sip")
    assert isinstance(refused, Refusal) and refused.reason == "full" and refused.retry_after_s == 9
    assert "3 calls" in refused.message
    web1.release()
    web1.release()   # idempotent: the slot is not given back twice
    assert admission.active_calls() == 2 and admission.active_calls("webrtc") == 1
    sip2 = admission.try_admit("sip")
    assert isinstance(sip2, Ticket)
    sip1.release()
    sip2.release()
    # the transport's own cap: 2 WebRTC calls at most, though the process has room
    assert isinstance(admission.try_admit("webrtc"), Ticket)
    capped = admission.try_admit("webrtc")
    assert isinstance(capped, Refusal) and capped.reason == "transport_full" and "webrtc.max_calls" in capped.message


def test_refusals_reach_the_listeners():
    admission = Admission(Capacity(1, "test"))
    heard: list[tuple[str, str]] = []
    admission.on_refusal.append(lambda transport, refusal: heard.append((transport, refusal.reason)))
    admission.try_admit("sip")
    admission.try_admit("webrtc")
    assert heard == [("webrtc", "full")]


# ------------------------------------------------------------ the queue-wait guard
def test_the_guard_refuses_new_calls_while_queues_are_slow_and_leaves_calls_in_progress_alone():
    clock = Clock()
    admission = guarded(clock)
    in_progress = admission.try_admit("sip")
    assert isinstance(in_progress, Ticket)
    admission.record_turn({"stt": 150.0, "llm": 200.0, "tts": 50.0})   # 400 ms summed
    admission.record_turn({"llm": 500.0})
    assert isinstance(admission.try_admit("webrtc"), Ticket), "two turns are below min_turns: no verdict yet"
    admission.record_turn({"llm": 450.0})
    refused = admission.try_admit("webrtc")
    assert isinstance(refused, Refusal) and refused.reason == "saturated" and refused.retry_after_s == 7
    assert "saturated: engine queues at 495 ms" in refused.message, refused.message
    assert admission.remaining_calls() == 0
    state = admission.describe()
    assert state["ready"] is False and state["reason"].startswith("saturated") and state["active_calls"] == 2
    in_progress.release()   # calls in progress go on and end as usual
    assert admission.active_calls() == 1
    admission.record_turn({})   # a turn without queue figures changes nothing
    assert isinstance(admission.try_admit("webrtc"), Refusal)


def test_the_guard_recovers_when_fast_turns_fill_the_window():
    clock = Clock()
    admission = guarded(clock, window_turns=4, min_turns=3)
    for _ in range(4):
        admission.record_turn({"llm": 300.0})
    assert isinstance(admission.try_admit("sip"), Refusal)
    for _ in range(3):
        admission.record_turn({"stt": 5.0, "llm": 10.0})
    # window: one 300 ms turn and three 15 ms ones; p95 = 15 + 0.85 * 285 = 257 ms > 200: still saturated
    assert isinstance(admission.try_admit("sip"), Refusal)
    admission.record_turn({"llm": 10.0})
    assert isinstance(admission.try_admit("sip"), Ticket) and admission.describe()["ready"] is True


def test_the_guard_recovers_when_the_slow_turns_age_out_of_the_window():
    clock = Clock()
    admission = guarded(clock, window_s=30.0)
    for _ in range(5):
        admission.record_turn({"llm": 1000.0})
        clock.now += 1.0
    assert isinstance(admission.try_admit("sip"), Refusal)
    clock.now += 26.5   # the first slow turn is 30.5 s old: four are left, still enough to judge
    assert isinstance(admission.try_admit("sip"), Refusal)
    clock.now += 3.0    # 2 left: fewer than min_turns, no verdict
    assert isinstance(admission.try_admit("sip"), Ticket)
    clock.now += 10.0   # none left
    assert admission.queue_wait_p95_ms() is None and admission.describe()["queue_wait_p95_ms"] is None


def test_the_guard_off_admits_whatever_the_queues():
    admission = guarded(Clock(), max_queue_wait_ms=0.0)
    for _ in range(10):
        admission.record_turn({"llm": 10_000.0})
    assert isinstance(admission.try_admit("sip"), Ticket)


def test_percentile_is_numpys_linear_percentile():
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 20, 101):
        values = list(rng.exponential(100.0, n))
        for q in (50, 95, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_readiness_says_full():
    admission = Admission(Capacity(1, "test"))
    assert admission.describe()["ready"] is True and admission.describe()["remaining_calls"] == 1
    ticket = admission.try_admit("webrtc")
    state = admission.describe()
    assert state["ready"] is False and state["reason"] == "full: 1 of 1 calls in progress"
    assert state["active_by_transport"] == {"webrtc": 1}
    assert isinstance(ticket, Ticket)


# ------------------------------------------------------------ where the capacity comes from
def auto(tmp_path, **admission) -> Config:
    """The default configuration with max_calls = auto, the cache (where capacity.json is looked for) in tmp_path."""
    return override(load_config(environ={}), {"admission": {"max_calls": "auto", **admission},
                                              "models": {"cache_dir": str(tmp_path)}})


def test_a_number_is_the_capacity_and_auto_reads_the_benchmarks_file(tmp_path, caplog):
    config = override(load_config(environ={}), {"admission": {"max_calls": 12}, "sip": {"max_calls": 3}})
    admission = Admission.from_config(config, "cpu")
    assert admission.capacity == Capacity(12, "admission.max_calls")
    assert admission.transport_caps == {"webrtc": 8, "sip": 3}
    # the file `scripts/bench_load.py --write-capacity` writes, in the cache directory by default
    doc = {"capacity_calls": 6, "slo_ms": 1000, "machine": "2026-11-29; some CPU, 2 cores; no GPU",
           "date": "2026-11-29", "transport": "inproc"}
    (tmp_path / "capacity.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="sub300.agent.admission"):
        capacity = Admission.from_config(auto(tmp_path, capacity_calls=3), "cpu").capacity
    assert capacity.calls == 6 and "SLO 1000 ms" in capacity.source and "capacity.json" in capacity.source
    assert not caplog.records
    # measured without a GPU, served on one: used, with a warning that says to measure here
    with caplog.at_level(logging.WARNING, logger="sub300.agent.admission"):
        assert Admission.from_config(auto(tmp_path), "cuda").capacity.calls == 6
    assert "another kind of machine" in caplog.text and "--write-capacity" in caplog.text
    # another file, named in the configuration; 0 (not even one call held the SLO) admits one call
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({**doc, "capacity_calls": 0}))
    assert Admission.from_config(auto(tmp_path, capacity_file=str(other)), "cpu").capacity.calls == 1


def test_auto_without_a_file_uses_the_configured_capacity_then_a_logged_guess(tmp_path, caplog):
    assert Admission.from_config(auto(tmp_path, capacity_calls=5), "cpu").capacity == \
        Capacity(5, "admission.capacity_calls")
    with caplog.at_level(logging.WARNING, logger="sub300.agent.admission"):
        capacity = Admission.from_config(auto(tmp_path), "cuda").capacity
    assert capacity.calls == GUESSED_CAPACITY["cuda"] and "guess" in capacity.source
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "GUESSING" in record.message
    assert "scripts/bench_load.py --write-capacity" in record.message


def test_a_broken_capacity_file_is_an_error_in_the_log_not_a_silent_guess(tmp_path, caplog):
    for text in ("{not json", json.dumps({"capacity_calls": "many"}), json.dumps([1, 2])):
        (tmp_path / "capacity.json").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sub300.agent.admission"):
            capacity = Admission.from_config(auto(tmp_path, capacity_calls=4), "cpu").capacity
        assert capacity.calls == 4
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "capacity.json" in errors[0].message, caplog.text


@pytest.mark.parametrize(("environ", "key"), [
    ({"SUB300_ADMISSION_MAX_CALLS": "lots"}, "admission.max_calls"),
    ({"SUB300_ADMISSION_MAX_CALLS": "0"}, "admission.max_calls"),
    ({"SUB300_ADMISSION_MAX_QUEUE_WAIT_MS": "-1"}, "admission.max_queue_wait_ms"),
    ({"SUB300_ADMISSION_RETRY_AFTER_S": "0"}, "admission.retry_after_s"),
    ({"SUB300_ADMISSION_MIN_TURNS": "30"}, "admission.min_turns"),
])
def test_bad_admission_settings_name_their_key(environ, key):
    with pytest.raises(ConfigError) as error:
        load_config(environ=environ)
    assert str(error.value).startswith(key), str(error.value)


def test_admission_settings_from_the_environment():
    assert load_config(environ={"SUB300_ADMISSION_MAX_CALLS": "auto"}).admission.max_calls == "auto"
    assert load_config(environ={"SUB300_ADMISSION_MAX_CALLS": "24"}).admission.max_calls == 24


# ------------------------------------------------------------ metrics
def finished(turn: int, queue_ms: dict[str, float], work_ms: dict[str, float]) -> TurnFinished:
    ledger = TurnLedger(turn, {"speech_end": 1.0, "endpoint": 1.25, "first_audio_out": 1.9},
                        queue_ms=queue_ms, work_ms=work_ms)
    return TurnFinished(turn, "hi", "hello", ledger)


def test_metrics_show_capacity_refusals_and_queue_waits_and_feed_the_guard():
    admission = guarded(Clock(), calls=2, min_turns=1)
    observer = MetricsObserver(300, admission=admission)
    assert admission.try_admit("sip") and admission.try_admit("sip")
    assert isinstance(admission.try_admit("webrtc"), Refusal)
    text = observer.render().decode()
    assert "sub300_capacity_calls 2.0" in text and "sub300_capacity_remaining_calls 0.0" in text
    assert 'sub300_calls_refused_total{reason="full",transport="webrtc"} 1.0' in text
    listener = observer.call_started("sip", "c1")
    listener(finished(1, {"stt": 0.0, "llm": 250.0, "tts": 20.0}, {"stt": 90.0, "llm": 180.0, "tts": 60.0}))
    text = observer.render().decode()
    assert 'sub300_queue_wait_seconds_sum{engine="llm",transport="sip"} 0.25' in text
    assert 'sub300_engine_work_seconds_sum{engine="stt",transport="sip"} 0.09' in text
    assert "sub300_admission_queue_wait_p95_seconds 0.27" in text
    assert admission.queue_wait_p95_ms() == pytest.approx(270.0)   # the turn's summed wait reached the guard


# ------------------------------------------------------------ HTTP: /offer, /readyz
@pytest.fixture(scope="module")
def seed() -> str:
    return asyncio.run(seed_offer())


async def test_offer_refused_with_503_and_retry_after_and_readyz_follows(config, seed):
    config = copy.deepcopy(config)
    admission = Admission(Capacity(2, "test"), transport_caps={"webrtc": 2}, max_queue_wait_ms=100.0,
                          window_turns=5, min_turns=1, retry_after_s=11)
    app = build_app(config, fake_engines(), admission=admission)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async def get(path: str) -> tuple[int, dict, Any]:
                async with session.request("POST" if path == "/offer" else "GET", server.make_url(path),
                                           data=body(seed) if path == "/offer" else None) as r:
                    return r.status, await r.json(), r.headers

            status, ready, _ = await get("/readyz")
            assert status == 200 and ready["ready"] is True and ready["remaining_calls"] == 2
            # an answered offer holds a slot until its call is closed
            status, answer, _ = await get("/offer")
            assert status == 200 and admission.active_calls("webrtc") == 1
            sip_call = admission.try_admit("sip")    # a phone call takes the other slot
            status, refused, headers = await get("/offer")
            assert status == 503 and headers["Retry-After"] == "11" and "busy" in refused["error"]
            assert refused["reason"] == "full"
            status, ready, _ = await get("/readyz")
            assert status == 503 and ready["ready"] is False and ready["reason"].startswith("full")
            assert isinstance(sip_call, Ticket)
            sip_call.release()
            admission.record_turn({"llm": 400.0})   # the guard trips: saturated
            status, refused, headers = await get("/offer")
            assert status == 503 and headers["Retry-After"] == "11" and refused["error"].startswith("saturated")
            status, ready, _ = await get("/readyz")
            assert status == 503 and ready["reason"].startswith("saturated")
            async with session.get(server.make_url("/metrics")) as r:
                metrics = await r.text()
            assert 'sub300_calls_refused_total{reason="saturated",transport="webrtc"} 1.0' in metrics
            assert "sub300_capacity_remaining_calls 0.0" in metrics
            status, health, _ = await get("/healthz")
            assert status == 200 and health["admission"]["active_calls"] == 1   # liveness: still 200
            await app[SIGNALLING_KEY].close_all()
            assert admission.active_calls() == 0
    finally:
        await server.close()


# ------------------------------------------------------------ SIP: INVITE refused with 503 + Retry-After
async def test_sip_invite_refused_by_the_shared_admission_gets_503_with_retry_after(config):
    admission = Admission(Capacity(1, "test"), retry_after_s=13)
    web_call = admission.try_admit("webrtc")
    assert isinstance(web_call, Ticket)
    async with sip_service(config, call_factory=echo_calls, admission=admission) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client))
        refused = await client.expect(503)
        assert header(refused, "Retry-After") == "13" and "busy" in header(refused, "Warning")
        assert service.active_calls == 0 and observer.calls == {}
        web_call.release()
        ok = await call(client, call_id="c2", branch="z9hG4bK-2")
        assert admission.active_calls("sip") == 1
        await hang_up(client, ok)
        assert admission.active_calls() == 0
        client.close()

