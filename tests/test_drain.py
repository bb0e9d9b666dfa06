"""The drain (sub300/drain.py), fast: the admission's "draining" state, /readyz and /livez, a conversation
ending politely after its turn, and the sequence itself with fake call sets on virtual time (looptime).

The real thing — `sub300 serve`, a WebRTC and a SIP call, SIGTERM — is tests/test_drain_serve.py (slow).
"""
from __future__ import annotations

import asyncio
import copy
import signal

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sub300.agent.admission import Admission, Capacity, Refusal, Ticket
from sub300.agent.conversation import DRAIN
from sub300.agent.events import AgentSpeech, HangupRequested, TurnFinished
from sub300.drain import Drain
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller
from sub300.web.server import Readiness, build_app

from .test_sip_protocol import Client, call, header, invite
from .test_sip_support import echo_calls, sip_service
from .test_webrtc_offers import body, seed_offer

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")


# ------------------------------------------------------------ the admission
def test_a_draining_admission_refuses_every_new_call_and_keeps_the_calls_in_progress():
    admission = Admission(Capacity(4, "test"), retry_after_s=7)
    held = admission.try_admit("sip")
    refused: list[tuple[str, str]] = []
    admission.on_refusal.append(lambda transport, refusal: refused.append((transport, refusal.reason)))
    admission.drain()
    admission.drain()   # idempotent
    for transport in ("webrtc", "sip"):
        refusal = admission.try_admit(transport)
        assert isinstance(refusal, Refusal) and refusal.reason == "draining" and refusal.retry_after_s == 7
    assert refused == [("webrtc", "draining"), ("sip", "draining")]
    state = admission.describe()
    assert state["ready"] is False and state["reason"] == "draining" and state["remaining_calls"] == 0
    assert isinstance(held, Ticket) and admission.active_calls() == 1
    held.release()
    assert admission.active_calls() == 0 and admission.describe()["reason"] == "draining"


async def test_readyz_waits_for_the_listeners_then_says_draining_and_livez_stays_200(config):
    admission = Admission(Capacity(2, "test"))
    readiness = Readiness(("sip",))
    app = build_app(copy.deepcopy(config), fake_engines(), admission=admission, readiness=readiness)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async def get(path: str) -> tuple[int, dict]:
                async with session.get(server.make_url(path)) as r:
                    return r.status, await r.json()

            assert await get("/readyz") == (503, {**admission.describe(), "ready": False,
                                                  "reason": "starting: waiting for sip"})
            readiness.bound("sip")
            status, ready = await get("/readyz")
            assert status == 200 and ready["ready"] is True
            admission.drain()
            status, ready = await get("/readyz")
            assert status == 503 and ready["ready"] is False and ready["reason"] == "draining"
            assert await get("/livez") == (200, {"status": "ok"})
            async with session.post(server.make_url("/offer"), data=body(await seed_offer())) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "5"
                assert (await r.json())["reason"] == "draining"
            async with session.get(server.make_url("/metrics")) as r:   # counted like every refusal
                assert 'sub300_calls_refused_total{reason="draining",transport="webrtc"} 1.0' in await r.text()
    finally:
        await server.close()


# ------------------------------------------------------------ SIP: the drain's view of the calls
async def test_sip_drain_answers_a_ringing_call_503_and_byes_an_agent_that_cannot_end_politely(config):
    admission = Admission(Capacity(4, "test"), retry_after_s=9)
    async with sip_service(config, call_factory=echo_calls, admission=admission) as (service, observer):
        client = await Client.open(service.address)
        await call(client)                      # an echo agent: no end_politely
        while any(d.pending_ack is not None for d in service.uas.dialogs.values()):
            await asyncio.sleep(0.01)           # our ACK is in (no BYE before it: RFC 3261 §15)
        service.end_calls_politely("bye")
        bye = await client.expect(0, method="BYE")
        assert header(bye, "Call-ID") == "c1" and service.active_calls == 0
        client.close()
    async with sip_service(config, call_factory=echo_calls, admission=admission, answer_delay_s=30) as (service, _):
        client = await Client.open(service.address)
        client.send(invite(client, call_id="ringing"))
        await client.expect(100)
        await client.expect(180)
        service.end_calls_politely("bye")
        refused = await client.expect(503)
        assert header(refused, "Retry-After") == "9" and service.active_calls == 0
        client.close()


# ------------------------------------------------------------ a conversation ends politely
@pytest.mark.looptime
async def test_end_politely_lets_the_reply_play_out_then_says_the_goodbye_and_hangs_up(config):
    c = copy.deepcopy(config)
    c.stt.partial_interval_ms = 0
    tokens = ["Well", "."] + [" and", " so", " on", "."] * 4   # five pieces of 500 ms each
    fakes = fake_engines(stt=FakeStt("Tell me more.", delay_s=0.1),
                         llm=FakeLlm(tokens, first_token_s=0.05, per_token_s=0.01),
                         tts=FakeTts(delay_s=0.03, ms_per_piece=500))
    caller = ScriptedCaller(fakes, c, clock=asyncio.get_running_loop().time)
    conversation = caller.conversation
    try:
        await caller.say(speech(1.0))
        await caller.wait_until(lambda: any(isinstance(e, AgentSpeech) for e in caller.events), timeout=10)
        assert conversation.end_politely(DRAIN, "Goodbye from the drain.")
        assert not conversation.end_politely(DRAIN, "again")   # once
        await caller.say(speech(1.0))   # the caller speaking now makes no turn
        await caller.wait_until(lambda: any(isinstance(e, HangupRequested) for e in caller.events), timeout=30)
        kinds = [e for e in caller.events if isinstance(e, AgentSpeech | TurnFinished | HangupRequested)]
        finished = [e for e in kinds if isinstance(e, TurnFinished)]
        assert len(finished) == 1 and finished[0].reply == "".join(tokens).strip()   # the whole reply, not cut
        assert isinstance(kinds[-2], AgentSpeech) and kinds[-2].text == "Goodbye from the drain."
        assert kinds.index(finished[0]) < len(kinds) - 2   # the goodbye comes after the turn is done
        assert isinstance(kinds[-1], HangupRequested) and kinds[-1].reason == DRAIN
        assert fakes.tts.pieces[-1] == "Goodbye from the drain."
    finally:
        await caller.close()


# ------------------------------------------------------------ the sequence
class FakeCalls:
    """A transport whose calls end ``polite_s`` after `end_politely` (never, when None)."""

    name = "fake"

    def __init__(self, calls: int, polite_s: float | None) -> None:
        self.calls, self.polite_s = calls, polite_s
        self.log: list[tuple[str, float, str]] = []

    def active_calls(self) -> int:
        return self.calls

    def end_politely(self, goodbye: str) -> None:
        loop = asyncio.get_running_loop()
        self.log.append(("polite", loop.time(), goodbye))
        if self.polite_s is not None:
            loop.call_later(self.polite_s, self._ended)

    def _ended(self) -> None:
        self.calls = 0

    async def end_now(self, reason: str) -> None:
        self.log.append(("now", asyncio.get_running_loop().time(), reason))
        await asyncio.sleep(0.05)
        self.calls = 0


def sequence(calls: FakeCalls, timeout_s: float, closers: list[str]) -> tuple[Drain, Admission]:
    admission = Admission(Capacity(4, "test"))
    drain = Drain(admission, timeout_s=timeout_s, goodbye="bye")
    drain.calls.append(calls)

    def closer(name: str):
        async def close() -> None:
            closers.append(name)
            if name == "broken":
                raise RuntimeError("a closer that fails")
        return close

    drain.closers += [("sip", closer("sip")), ("web", closer("web")), ("records", closer("records"))]
    return drain, admission


@pytest.mark.looptime
async def test_the_drain_waits_for_the_calls_to_end_politely_then_runs_the_closers_in_order():
    closed: list[str] = []
    calls = FakeCalls(2, polite_s=4.0)
    drain, admission = sequence(calls, 30.0, closed)
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(drain.run())
    await asyncio.sleep(1.0)
    assert not drain.stopping and calls.log == [] and not admission.draining
    drain.signal(signal.SIGTERM)
    assert await running == 0
    assert admission.draining and drain.outcome == "drained" and closed == ["sip", "web", "records"]
    assert calls.log == [("polite", pytest.approx(1.0), "bye")]
    assert loop.time() == pytest.approx(5.0, abs=0.11)   # the calls' 4 s, seen within a poll


@pytest.mark.looptime
async def test_the_timeout_ends_the_calls_left_and_the_exit_is_still_0():
    closed: list[str] = []
    calls = FakeCalls(1, polite_s=None)   # a call that never ends by itself
    drain, _ = sequence(calls, 10.0, closed)
    drain.signal(signal.SIGTERM)
    assert await drain.run() == 0
    assert drain.outcome == "timeout" and closed == ["sip", "web", "records"]
    assert [(kind, reason) for kind, _, reason in calls.log] == [("polite", "bye"), ("now", "drain timeout")]
    assert calls.log[1][1] == pytest.approx(10.0, abs=0.01)


@pytest.mark.looptime
async def test_a_second_signal_ends_the_calls_at_once():
    closed: list[str] = []
    calls = FakeCalls(1, polite_s=20.0)
    drain, _ = sequence(calls, 30.0, closed)
    loop = asyncio.get_running_loop()
    loop.call_later(2.0, drain.signal, signal.SIGINT)
    drain.signal(signal.SIGTERM)
    assert await drain.run() == 0
    assert drain.outcome == "forced" and calls.log[-1][0] == "now" and calls.log[-1][1] == pytest.approx(2.0)
    assert closed == ["sip", "web", "records"]


@pytest.mark.looptime
async def test_a_drain_timeout_of_0_ends_the_calls_at_once_without_a_goodbye():
    closed: list[str] = []
    calls = FakeCalls(3, polite_s=1.0)
    drain, _ = sequence(calls, 0.0, closed)
    drain.signal(signal.SIGTERM)
    assert await drain.run() == 0
    assert [kind for kind, _, _ in calls.log] == ["now"] and calls.log[0][1] == 0.0 and drain.outcome == "timeout"


@pytest.mark.looptime
async def test_a_failing_or_stuck_closer_is_logged_the_next_ones_still_run_and_the_exit_is_1(caplog):
    closed: list[str] = []
    drain, _ = sequence(FakeCalls(0, polite_s=None), 5.0, closed)

    async def stuck() -> None:
        await asyncio.sleep(3600)

    drain.closers[1:1] = [("broken", _raise), ("stuck", stuck)]
    drain.signal(signal.SIGTERM)
    assert await drain.run() == 1
    assert closed == ["sip", "web", "records"] and drain.outcome == "drained"
    assert "closing broken failed" in caplog.text and "closing stuck did not finish within 10 s" in caplog.text


async def _raise() -> None:
    raise RuntimeError("a closer that fails")


# ------------------------------------------------------------ systemd's notify socket
def test_sd_notify_sends_one_datagram_to_the_socket_systemd_names(tmp_path):
    import socket

    from sub300.sd_notify import notify

    assert notify("READY=1", environ={}) is False   # not under systemd: nothing to do
    for address, bound in ((str(tmp_path / "notify"), str(tmp_path / "notify")),
                           (f"@sub300-test-{id(tmp_path)}", f"\0sub300-test-{id(tmp_path)}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.bind(bound)
            assert notify("READY=1\nSTATUS=serving", environ={"NOTIFY_SOCKET": address}) is True
            assert manager.recv(256) == b"READY=1\nSTATUS=serving"
    assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False   # logged, not raised
