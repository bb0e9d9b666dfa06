"""SIP across nodes: sipp → Kamailio (dispatcher, round robin, OPTIONS probes) → two sub300 SIP services.

The slow test runs scripts/kamailio/kamailio.cfg as it is (without rtpengine: ``-A WITHOUT_RTPENGINE``, the
media goes straight to the node; tests/test_sip_kamailio.py runs it with rtpengine) in front of two SIP
services in this process, on loopback, with the real engines:

* calls spread over both nodes (round robin), and the caller's BYE reaches the node that answered
  (record_route: it would get 481 anywhere else, and sipp would fail);
* one node drains (sub300/drain.py's sequence, as on SIGTERM) while a call is in progress: that call
  finishes its turn, says goodbye and hangs up (our BYE back through Kamailio); the node answers Kamailio's
  OPTIONS 503, so new calls all go to the other node and the drained node sees no INVITE at all.

The fast test checks the OPTIONS answer itself (media/sip/dialogs.py): 200 while a call would be admitted,
503 with Retry-After while the server is busy or draining.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest

from sub300.agent.admission import Admission, Capacity
from sub300.agent.config import ServerConfig
from sub300.drain import Drain, SipCalls

from .test_sip_kamailio import _free_udp_port, _wait_udp_listener
from .test_sip_protocol import Client, call, header
from .test_sip_support import Peer, echo_calls, scenario_call, sip_service, sipp, sipp_errors, ulaw_question, words

CFG = Path(__file__).resolve().parent.parent / "scripts" / "kamailio" / "kamailio.cfg"
PING_INTERVAL_S = 1   # Kamailio's OPTIONS probe period (its smallest: whole seconds)
PEERS_MISSING = not all(shutil.which(b) or Path(b).exists() for b in ("sipp", "/usr/sbin/kamailio"))


def _options(client: Client, n: int) -> str:
    return (f"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{client.port};branch=z9hG4bK-ping{n}\r\n"
            f"From: <sip:kamailio@localhost>;tag=p{n}\r\nTo: <sip:127.0.0.1>\r\nCall-ID: ping{n}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


async def test_options_answers_503_while_busy_or_draining(config):
    admission = Admission(Capacity(1, "test"), retry_after_s=7)
    async with sip_service(config, call_factory=echo_calls, admission=admission) as (service, _):
        client = await Client.open(service.address)
        client.send(_options(client, 1))
        assert "INVITE" in header(await client.expect(200), "Allow")
        await call(client)                       # the one slot is taken: no room for a new call
        client.send(_options(client, 2))
        busy = await client.expect(503)
        assert header(busy, "Retry-After") == "7" and "busy" in header(busy, "Warning")
        admission.drain()
        client.send(_options(client, 3))
        draining = await client.expect(503)
        assert header(draining, "Retry-After") == "7" and "draining" in header(draining, "Warning")
        client.close()


class Node:
    """One SIP service with its own admission and drain, and every INVITE its admission refused."""

    def __init__(self, service, observer, admission: Admission) -> None:
        self.service, self.observer, self.admission = service, observer, admission
        self.refused: list[str] = []
        admission.on_refusal.append(lambda transport, refusal: self.refused.append(refusal.reason))
        self.drain = Drain(admission, timeout_s=60, goodbye=ServerConfig().drain_goodbye)
        self.drain.calls.append(SipCalls(service))

    def live(self) -> list:
        return [r for r in self.observer.calls.values() if r.ended is None]


async def _short_call(tmp_path, silence: str, target: tuple[str, int], name: str) -> None:
    """One call that hangs up itself after a second (its BYE must reach the node that answered)."""
    caller = sipp(tmp_path, scenario_call(silence, then="bye", bye_after_ms=1000), target, name)
    try:
        rc = await caller.wait(30)
    finally:
        caller.stop()
    assert rc == 0, sipp_errors(tmp_path, name) + caller.tail()


@pytest.mark.slow
@pytest.mark.skipif(PEERS_MISSING, reason="sipp or kamailio missing")
async def test_kamailio_spreads_calls_and_a_drained_node_finishes_its_call_and_gets_no_new_one(
        config, engines, tmp_path):
    silence, _ = ulaw_question(tmp_path, "silence", 0.5)
    question, _ = ulaw_question(tmp_path, "q", 0.5, "What is the capital of France?", 1.5)
    sip_port = _free_udp_port()
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for _ in range(2):
            admission = Admission.per_transport("sip", 4)
            nodes.append(Node(*await stack.enter_async_context(sip_service(config, engines, admission=admission)),
                              admission))
        (tmp_path / "sub300.list").write_text("".join(f"1 sip:127.0.0.1:{n.service.address[1]}\n" for n in nodes))
        kamailio = Peer(["/usr/sbin/kamailio", "-DD", "-E", "-f", str(CFG), "-Y", str(tmp_path), "-w", str(tmp_path),
                         "-A", f"LISTEN=udp:127.0.0.1:{sip_port}", "-A", "WITHOUT_RTPENGINE",
                         "-A", f"PING_INTERVAL={PING_INTERVAL_S}",
                         "-A", f'DISPATCHER_LIST="{tmp_path / "sub300.list"}"'],
                        log_path=str(tmp_path / "kamailio.log"))
        stack.callback(kamailio.stop)
        await _wait_udp_listener(sip_port)
        target = ("127.0.0.1", sip_port)

        # 1. four calls, one after another: round robin puts two on each node
        for i in range(4):
            await _short_call(tmp_path, silence, target, f"spread{i}")
        assert [len(n.observer.calls) for n in nodes] == [2, 2], kamailio.tail()
        assert all(r.ended for n in nodes for r in n.observer.calls.values())

        # 2. a call in progress on one node; that node drains once the caller's question is transcribed
        sipp_peer = sipp(tmp_path, scenario_call(question, timeout_ms=60000), target, "long")
        stack.callback(sipp_peer.stop)
        async with asyncio.timeout(60):
            while not any(e.kind == "transcript" and getattr(e, "final", False)
                          for n in nodes for r in n.live() for e in r.events):
                await asyncio.sleep(0.05)
        (drained,) = [n for n in nodes if n.live()]
        (other,) = [n for n in nodes if n is not drained]
        before = len(other.observer.calls)
        draining = asyncio.create_task(drained.drain.drain())

        # 3. new calls after a probe has seen the 503: all on the other node, none even offered to the drained
        await asyncio.sleep(2 * PING_INTERVAL_S + 0.5)
        for i in range(3):
            await _short_call(tmp_path, silence, target, f"after{i}")
        assert len(other.observer.calls) == before + 3, kamailio.tail()
        assert drained.refused == [], f"INVITEs reached the drained node: {drained.refused}"

        # the call in progress finished: its answer, the goodbye, our BYE through Kamailio, sipp's 200
        assert await sipp_peer.wait(60) == 0, sipp_errors(tmp_path, "long") + sipp_peer.tail() + kamailio.tail()
        assert await asyncio.wait_for(draining, 30) == "drained"
    (record,) = [r for r in drained.observer.calls.values() if r.turns]
    assert record.ended == "agent hung up"   # after the goodbye: our BYE went back through Kamailio
    assert {"capital", "france"} <= words(record.turns[0].transcript), record.turns[0].transcript
