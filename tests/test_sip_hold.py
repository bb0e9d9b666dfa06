"""Call hold (RFC 3264 §8.4): the agent's audio and turn detection pause; resume continues or drops the rest.

Two levels, both fast:

* the transport-free API, `Conversation.hold` / `unhold`, on fake engines
  and virtual time (`ScriptedCaller`, looptime): what was played, what the
  caller's audio during the hold (music on hold) did, what the history says;
* the SIP side with the fake `EchoAgent`: re-INVITEs that hold in each of
  the ways phones do it (``a=sendonly``, ``a=inactive``, ``c=0.0.0.0``, at
  session or media level), the direction our answer mirrors, the agent held
  and resumed (``sip.on_resume``), and no agent RTP while held.

The end-to-end case (sipp re-INVITEs while the agent answers) is in
test_sip_sipp.py.
"""
from __future__ import annotations

import asyncio
import copy
import re
import struct

import numpy as np
import pytest

from sub300.agent.events import BargeInEvent, CallHeld, CallResumed, StateChanged, TurnFinished
from sub300.media.sip import g711
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

from .test_sip_protocol import SDP, Client, call, hang_up, header, in_dialog, invite
from .test_sip_support import echo_calls, sip_service

QUESTION = "What is the capital of France?"
TOKENS = ["Sure", ".", " Paris", " is", " lovely", "."]   # two pieces: "Sure." and "Paris is lovely."
PIECE_S = 1.0                                             # FakeTts: one second of tone per piece


# ------------------------------------------------------------------ the conversation (virtual time)
def caller_on(config) -> ScriptedCaller:
    engines = fake_engines(stt=FakeStt(QUESTION, delay_s=0.105), llm=FakeLlm(TOKENS, first_token_s=0.045),
                           tts=FakeTts(delay_s=0.033, ms_per_piece=PIECE_S * 1000))
    return ScriptedCaller(engines, copy.deepcopy(config), clock=asyncio.get_running_loop().time)


def frames_between(caller: ScriptedCaller, start: float, end: float) -> int:
    return sum(1 for at, _ in caller.agent_audio if start <= at < end)


async def held_call(caller: ScriptedCaller, *, after_s: float, drop: bool) -> tuple[float, float]:
    """Ask, let the agent speak ``after_s``, hold for 3 s of music on hold, resume; returns (held, resumed)."""
    await caller.silence(0.5)
    await caller.say(speech(1.0))
    await caller.wait_until(lambda: caller.playout.audible)
    await caller.silence(after_s)
    held = caller.clock()
    caller.conversation.hold()
    await caller.say(speech(2.5, seed=5))       # music on hold: loud, "voiced", for longer than a turn
    await caller.silence(0.5)
    resumed = caller.clock()
    caller.conversation.unhold(drop_rest=drop)
    await caller.until_idle()
    return held, resumed


@pytest.mark.looptime
async def test_hold_pauses_playout_and_turn_detection_and_resume_continues(config):
    pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
    caller = caller_on(config)
    try:
        held, resumed = await held_call(caller, after_s=0.5, drop=False)
    finally:
        await caller.close()
    assert frames_between(caller, held + 0.02, resumed) == 0, "agent audio went out during the hold"
    # continued from the sample where it stopped: the 2 s reply in exactly 100 frames, none played twice
    assert len(caller.agent_audio) == int(2 * PIECE_S / 0.02)
    assert frames_between(caller, resumed, resumed + 10) == len(caller.agent_audio) - frames_between(caller, 0, held + 0.02)
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]   # the music on hold was no turn
    assert turn.reply == "Sure. Paris is lovely." and turn.ledger.notes["interrupted"] is False
    assert caller.conversation.history.exchanges == [(QUESTION, "Sure. Paris is lovely.")]
    assert not [e for e in caller.events if isinstance(e, BargeInEvent)], "music on hold barged in"
    kinds = [e.kind for e in caller.events if isinstance(e, CallHeld | CallResumed | StateChanged)]
    assert kinds.count("call_held") == 1 and kinds.count("call_resumed") == 1
    states = [e.state.value for e in caller.events if isinstance(e, StateChanged)]
    assert states == ["caller_speaking", "thinking", "agent_speaking", "listening"]   # the hold moves no state
    assert [e for e in caller.events if isinstance(e, CallResumed)][0].dropped_s == 0


@pytest.mark.looptime
async def test_resume_with_drop_keeps_only_what_was_heard(config):
    pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
    caller = caller_on(config)
    try:
        held, resumed = await held_call(caller, after_s=1.5, drop=True)   # "Sure." and half of the second piece
    finally:
        await caller.close()
    played = len(caller.agent_audio)
    assert frames_between(caller, held + 0.02, resumed + 60) == 0, "audio after a resume with drop"
    assert played == pytest.approx(1.5 / 0.02, abs=2)
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert turn.ledger.notes["interrupted"] is True
    assert turn.reply == "Sure. Paris"                      # 1 s of "Sure.", half of "Paris is lovely."
    assert caller.conversation.history.exchanges == [(QUESTION, "Sure. Paris")]
    (resume,) = [e for e in caller.events if isinstance(e, CallResumed)]
    assert resume.dropped_s == pytest.approx(2 * PIECE_S - played * 0.02, abs=0.03)
    assert caller.conversation.state.value == "listening"


@pytest.mark.looptime
async def test_a_hold_before_the_first_audio_holds_the_whole_reply(config):
    pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
    caller = caller_on(config)
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        caller.conversation.hold()                          # the caller's turn is still open: it ends on silence
        await caller.say(speech(1.0, seed=7))
        await caller.silence(1.0)
        resumed = caller.clock()
        assert caller.agent_audio == [] and caller.conversation.busy
        caller.conversation.unhold()
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert turn.ledger.marks["first_audio_out"] >= resumed
    assert turn.reply == "Sure. Paris is lovely." and len(caller.agent_audio) == int(2 * PIECE_S / 0.02)


# ------------------------------------------------------------------ SIP (EchoAgent, real sockets on 127.0.0.1)
def hold_sdp(port: int, *, session: str = "sendrecv", media: str | None = None, host: str = "127.0.0.1") -> str:
    body = SDP.format(port=port, fmts="0 101").replace("a=sendrecv\r\n", "")
    body = body.replace("c=IN IP4 127.0.0.1", f"c=IN IP4 {host}").replace("t=0 0\r\n", f"t=0 0\r\na={session}\r\n")
    return body + (f"a={media}\r\n" if media else "")


class Media(asyncio.DatagramProtocol):
    """The caller's RTP socket: collects what the agent sends."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagram_received(self, data, addr):
        self.packets.append(data)


# each step: (session direction, media direction, connection address) → (our answer, held?)
STEPS = [
    (("sendrecv", "sendonly", "127.0.0.1"), ("recvonly", True)),     # RFC 3264 §8.4 hold
    (("sendrecv", "inactive", "127.0.0.1"), ("inactive", True)),     # still held
    (("sendrecv", None, "127.0.0.1"), ("sendrecv", False)),          # resume
    (("sendonly", None, "127.0.0.1"), ("recvonly", True)),           # hold at session level
    (("sendrecv", "sendrecv", "127.0.0.1"), ("sendrecv", False)),    # the media level wins
    (("sendrecv", None, "0.0.0.0"), ("recvonly", True)),             # RFC 2543 hold
    (("inactive", None, "0.0.0.0"), ("inactive", True)),
    (("recvonly", None, "127.0.0.1"), ("sendonly", False)),          # the caller only listens: the agent speaks
]


@pytest.mark.parametrize("on_resume", ["continue", "drop"])
async def test_reinvite_hold_and_resume_in_every_style(config, on_resume):
    async with sip_service(config, call_factory=echo_calls, sip={"on_resume": on_resume}) as (service, observer):
        client = await Client.open(service.address)
        loop = asyncio.get_running_loop()
        rtp, media = await loop.create_datagram_endpoint(Media, local_addr=("127.0.0.1", 0))
        port = rtp.get_extra_info("sockname")[1]
        ok = await call(client, rtp_port=port)
        (dialog,) = service.uas.dialogs.values()
        agent = dialog.call.agent
        to_tag = ";tag=" + header(ok, "To").split("tag=")[1]
        agent_port = int(re.search(r"m=audio (\d+)", ok).group(1))
        expected_holds: list[str] = []
        held = False
        steps = STEPS if on_resume == "continue" else STEPS[:3]   # every style once; drop needs one hold
        for n, ((session, level, host), (answer, now_held)) in enumerate(steps, start=2):
            client.send(invite(client, branch=f"z9hG4bK-h{n}", cseq=n, to_tag=to_tag,
                               body=hold_sdp(port, session=session, media=level, host=host)))
            reply = await client.expect(200)
            client.send(in_dialog(client, "ACK", reply, n))
            directions = re.findall(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", reply, re.MULTILINE)
            assert directions == [answer], (session, level, host, reply)
            if now_held != held:
                expected_holds.append("hold" if now_held else on_resume)
                held = now_held
            assert agent.holds == expected_holds and dialog.call.held is now_held
            assert agent.playout.held is now_held
            # while held the agent sends nothing (not even silence), and the caller's audio is not echoed
            media.packets.clear()
            tone = g711.encode("PCMU", np.full(160, 3000, np.int16))
            for k in range(5):
                rtp.sendto(struct.pack("!BBHII", 0x80, 0, n * 100 + k, k * 160, 77) + tone, ("127.0.0.1", agent_port))
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.06)
            if now_held:
                assert media.packets == [], f"step {n}: {len(media.packets)} packets while on hold"
            else:
                loud = [p for p in media.packets if len(p) > 12 and p[12:] != g711.silence("PCMU", len(p) - 12)]
                assert loud, f"step {n}: no echo after the resume"
        await hang_up(client, ok, len(STEPS) + 3)
        rtp.close()
        client.close()
        assert (await observer.wait_ended())[0].ended == "caller hung up"


def test_sdp_hold_answers():
    from sub300.media.sip.sdp import negotiate, parse

    for (session, level, host), (answer, held) in STEPS:
        _, params = negotiate(parse(hold_sdp(4000, session=session, media=level, host=host).encode()), ["PCMU"])
        assert (params.direction, params.held) == (answer, held), (session, level, host)
    # the media-level c= line wins over the session's
    media_level = hold_sdp(4000).replace("a=rtpmap:0", "c=IN IP4 0.0.0.0\r\na=rtpmap:0", 1)
    _, params = negotiate(parse(media_level.encode()), ["PCMU"])
    assert params.held and params.direction == "recvonly" and params.remote_host == "0.0.0.0"
    # an IPv6 hold address, any spelling
    _, params = negotiate(parse(hold_sdp(4000, host="::").replace("IP4", "IP6").encode()), ["PCMU"])
    assert params.held and params.direction == "recvonly"


async def test_hold_in_the_ack_of_an_offerless_reinvite(config):
    """A re-INVITE without SDP: we offer in the 200, the caller answers ``sendonly`` in the ACK (RFC 3261 §14.1)."""
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        ok = await call(client, rtp_port=40010)
        (dialog,) = service.uas.dialogs.values()
        agent = dialog.call.agent
        to_tag = ";tag=" + header(ok, "To").split("tag=")[1]
        client.send(invite(client, branch="z9hG4bK-o2", cseq=2, to_tag=to_tag, body=""))
        offer = await client.expect(200)
        assert "a=sendrecv" in offer
        client.send(in_dialog(client, "ACK", offer, 2, body=hold_sdp(40010, media="sendonly"), ctype="application/sdp"))
        await asyncio.sleep(0.1)
        assert agent.holds == ["hold"] and dialog.call.held
        client.send(invite(client, branch="z9hG4bK-o3", cseq=3, to_tag=to_tag, body=hold_sdp(40010)))
        client.send(in_dialog(client, "ACK", await client.expect(200), 3))
        assert agent.holds == ["hold", "continue"] and not dialog.call.held
        await hang_up(client, ok, 4)
        client.close()
        await observer.wait_ended()


async def test_a_reinvite_holds_the_conversation_itself(config):
    """dialogs → SipCall → `Conversation` (on the named fakes): the hold reaches the agent and its events the observer."""
    from sub300.media.sip.service import conversation_calls

    factory = conversation_calls(fake_engines(), config)
    async with sip_service(config, call_factory=factory, sip={"on_resume": "drop"}) as (service, observer):
        client = await Client.open(service.address)
        ok = await call(client, rtp_port=40020)
        (dialog,) = service.uas.dialogs.values()
        conversation = dialog.call.agent
        to_tag = ";tag=" + header(ok, "To").split("tag=")[1]
        client.send(invite(client, branch="z9hG4bK-c2", cseq=2, to_tag=to_tag, body=hold_sdp(40020, media="inactive")))
        client.send(in_dialog(client, "ACK", await client.expect(200), 2))
        assert conversation.held and conversation.playout.held
        client.send(invite(client, branch="z9hG4bK-c3", cseq=3, to_tag=to_tag, body=hold_sdp(40020)))
        client.send(in_dialog(client, "ACK", await client.expect(200), 3))
        assert not conversation.held and not conversation.playout.held
        await hang_up(client, ok, 4)
        client.close()
        (record,) = await observer.wait_ended()
    assert [e.kind for e in record.events if isinstance(e, CallHeld | CallResumed)] == ["call_held", "call_resumed"]
