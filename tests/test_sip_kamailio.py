"""The same phone call through a real SIP edge: sipp → Kamailio (dispatcher, record-route) + rtpengine → sub300.

Kamailio and rtpengine run with scripts/kamailio/kamailio.cfg, started here
and stopped by PID.  The agent's BYE must find its way back through
Kamailio (Record-Route), and the media must flow through rtpengine: the
agent latches to rtpengine's port, not sipp's.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest

from sub300.agent.events import TurnFinished

from .test_sip_support import Peer, poke_when, scenario_call, sip_service, sipp, sipp_errors, ulaw_question, words

CFG = Path(__file__).resolve().parent.parent / "scripts" / "kamailio" / "kamailio.cfg"
RTPENGINE_PORTS = (31000, 31999)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not all(shutil.which(b) or Path(b).exists() for b in ("sipp", "rtpengine", "/usr/sbin/kamailio")),
    reason="sipp, rtpengine or kamailio missing")]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_udp_listener(port: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        with open("/proc/net/udp") as f:
            if any(int(line.split()[1].split(":")[1], 16) == port for line in list(f)[1:]):
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on UDP {port}")


async def test_call_through_kamailio_and_rtpengine(config, engines, tmp_path):
    ulaw, _ = ulaw_question(tmp_path, "q", 0.5, "What is the capital of France?", 1.0)
    goodbye, _ = ulaw_question(tmp_path, "bye", 0.3, "Goodbye.", 1.0)
    ng_port, sip_port = _free_udp_port(), _free_udp_port()
    async with sip_service(config, engines) as (service, observer):
        (tmp_path / "sub300.list").write_text(f"1 sip:127.0.0.1:{service.address[1]}\n")
        rtpengine = Peer(["rtpengine", "--foreground", "--log-stderr", "--table=-1", "--interface=127.0.0.1",
                          f"--listen-ng=127.0.0.1:{ng_port}", f"--port-min={RTPENGINE_PORTS[0]}",
                          f"--port-max={RTPENGINE_PORTS[1]}", "--log-level=5"],
                         log_path=str(tmp_path / "rtpengine.log"))
        kamailio = Peer(["/usr/sbin/kamailio", "-DD", "-E", "-f", str(CFG), "-Y", str(tmp_path), "-w", str(tmp_path),
                         "-A", f"LISTEN=udp:127.0.0.1:{sip_port}",
                         "-A", f'DISPATCHER_LIST="{tmp_path / "sub300.list"}"',
                         "-A", f'RTPENGINE_SOCK="udp:127.0.0.1:{ng_port}"'],
                        log_path=str(tmp_path / "kamailio.log"))
        try:
            await _wait_udp_listener(ng_port)
            await _wait_udp_listener(sip_port)
            caller = sipp(tmp_path, scenario_call(ulaw, goodbye=goodbye), ("127.0.0.1", sip_port))
            try:
                await poke_when(service, observer, lambda events: any(isinstance(e, TurnFinished) for e in events))
                rc = await caller.wait(60)
            finally:
                caller.stop()
            assert rc == 0, observer.describe() + sipp_errors(tmp_path) + caller.tail() + kamailio.tail()
            (call,) = await observer.wait_ended()
        finally:
            kamailio.stop()
            rtpengine.stop()
    assert call.ended == "agent hung up"   # our BYE went back through Kamailio to sipp
    assert {"capital", "france"} <= words(call.turns[0].transcript), call.turns[0].transcript
    summary = service.uas.ended_calls[-1]
    host, port = summary["latched"]
    assert RTPENGINE_PORTS[0] <= port <= RTPENGINE_PORTS[1], summary   # media anchored by rtpengine
    assert summary["rtp_sent"] > 100, summary
