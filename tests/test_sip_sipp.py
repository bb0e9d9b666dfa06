"""Phone calls from sipp, directly and through Kamailio + rtpengine: real SIP peers on loopback.

sipp places the call and streams a spoken question as μ-law RTP; the agent
answers on the same RTP path (symmetric RTP: it latches to sipp's media
socket), the call's events reach the observer, and the agent hangs up with
a BYE when the caller says goodbye.  Also: CANCEL while ringing, the
caller's BYE in the middle of a reply (nothing left running afterwards),
and a codec offer we cannot accept (488).
"""
from __future__ import annotations

import asyncio
import shutil

import pytest

from sub300.agent.events import AgentSpeech, TurnFinished

from .test_sip_support import (
    poke_when,
    scenario_call,
    scenario_cancel,
    scenario_rejected,
    sip_service,
    sipp,
    sipp_errors,
    ulaw_question,
    words,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing")]


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sip_audio")
    return {
        "question": ulaw_question(tmp, "question", 0.5, "What is the capital of France?", 1.0),
        "goodbye": ulaw_question(tmp, "goodbye", 0.3, "Goodbye.", 1.0),
        "story": ulaw_question(tmp, "story", 0.5, "Tell me a long story about a dragon.", 0.5),
    }


def _sipp_media_port_bound(pid: int, port: int) -> bool:
    """Whether process `pid` holds a UDP socket on `port` (where the agent sent its RTP)."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port and cols[9] in inodes:
                return True
    return False


async def test_sipp_call_is_heard_answered_and_hung_up_by_the_agent(config, engines, audio, tmp_path):
    async with sip_service(config, engines) as (service, observer):
        peer = sipp(tmp_path, scenario_call(audio["question"][0], goodbye=audio["goodbye"][0]), service.address)
        try:
            # while sipp is up: the agent's RTP goes to a socket that sipp holds
            latched = None
            for _ in range(200):
                await asyncio.sleep(0.05)
                calls = list(service.uas.dialogs.values())
                if calls and calls[0].call and calls[0].call.endpoint.stats.latched:
                    latched = calls[0].call.endpoint.stats.latched
                    break
            assert latched is not None, "no RTP from sipp"
            assert _sipp_media_port_bound(peer.pid, latched[1]), latched
            # once the answer has played, the caller says goodbye
            await poke_when(service, observer, lambda events: any(isinstance(e, TurnFinished) for e in events))
            rc = await peer.wait(60)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()   # 200 OK seen, the agent's BYE received and answered
        (call,) = await observer.wait_ended()
    assert call.ended == "agent hung up"
    assert {"capital", "france"} <= words(call.turns[0].transcript), call.turns[0].transcript
    assert call.turns[0].reply.strip()
    assert call.turns[0].ledger.voice_to_voice_ms > 0
    summary = service.uas.ended_calls[-1]
    assert summary["rtp_received"] > 100 and summary["rtp_sent"] > 100, summary


async def test_cancel_while_ringing(config, engines, tmp_path):
    async with sip_service(config, engines, answer_delay_s=3.0) as (service, observer):
        peer = sipp(tmp_path, scenario_cancel(300), service.address)
        try:
            rc = await peer.wait(20)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()
        await asyncio.sleep(0.2)
        assert service.active_calls == 0
        assert observer.calls == {}   # never answered, so never a call for the observer
        assert service.uas.ended_calls[-1]["reason"] == "cancelled"


async def test_caller_bye_in_the_middle_of_the_reply_leaves_nothing_running(config, engines, audio, tmp_path):
    ulaw, _ = audio["story"]
    before = set(asyncio.all_tasks())
    async with sip_service(config, engines) as (service, observer):
        running = set(asyncio.all_tasks())
        peer = sipp(tmp_path, scenario_call(ulaw, then="bye_on_info"), service.address)
        try:
            # the caller hangs up as soon as the agent has started its reply
            await poke_when(service, observer, lambda events: any(isinstance(e, AgentSpeech) for e in events))
            rc = await peer.wait(40)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()
        (call,) = await observer.wait_ended()
        assert call.ended == "caller hung up"
        assert any(isinstance(e, AgentSpeech) for e in call.events), call.kinds()   # it was speaking...
        assert not any(isinstance(e, TurnFinished) for e in call.events), call.kinds()   # ...and was cut off
        await asyncio.sleep(0.3)
        assert service.active_calls == 0
        leftover = [t for t in asyncio.all_tasks() - running if not t.done()]
        assert leftover == [], leftover
    assert {t for t in asyncio.all_tasks() if not t.done()} <= before | {asyncio.current_task()}


@pytest.mark.parametrize("transport", ["u1", "t1"])   # UDP, TCP
async def test_unsupported_codec_gets_488(config, engines, tmp_path, transport):
    gsm = ("3 18", "      a=rtpmap:3 GSM/8000\n      a=rtpmap:18 G729/8000")
    async with sip_service(config, engines) as (service, observer):
        peer = sipp(tmp_path, scenario_rejected(*gsm, expect=488), service.address, "sipp", "-t", transport)
        try:
            rc = await peer.wait(20)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()
        assert observer.calls == {} and service.active_calls == 0
