"""Phone calls from sipp, directly and through Kamailio + rtpengine: real SIP peers on loopback.

sipp places the call and streams a spoken question as μ-law RTP; the agent
answers on the same RTP path (symmetric RTP: it latches to sipp's media
socket), the call's events reach the observer, and the agent hangs up with
a BYE when the caller says goodbye.  Also: CANCEL while ringing, the
caller's BYE in the middle of a reply (nothing left running afterwards),
a codec offer we cannot accept (488), and hold: re-INVITEs at 3.0 s
(sendonly) and 6.0 s (sendrecv) while the agent answers, with music on
hold in between (issue 9, field case hold_question.wav).
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from sub300.agent.events import AgentSpeech, CallHeld, CallRecorded, CallResumed, TranscriptEvent, TurnFinished

from .speech import speak
from .test_recording import read_wav
from .test_sip_support import (
    poke_when,
    scenario_call,
    scenario_cancel,
    scenario_hold,
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
    config = config.model_copy(deep=True)        # and records the call (agent/recording.py)
    config.records.record_audio, config.records.recordings_dir = True, str(tmp_path / "recordings")
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
        # 200 OK seen, the agent's BYE received and answered
        assert rc == 0, observer.describe() + sipp_errors(tmp_path) + peer.tail()
        (call,) = await observer.wait_ended()
    assert call.ended == "agent hung up"
    assert {"capital", "france"} <= words(call.turns[0].transcript), call.turns[0].transcript
    assert call.turns[0].reply.strip()
    assert call.turns[0].ledger.voice_to_voice_ms > 0
    # both legs' buffering in the ledger (media/sip/call.py): sipp's packets arrive in order, none held
    ledger = call.turns[0].ledger
    assert ledger.transport_ms["jitter_buffer_in"] < 5.0 and ledger.notes["pacing_late_ms"] >= 0, ledger.to_dict()
    summary = service.uas.ended_calls[-1]
    assert summary["rtp_received"] > 100 and summary["rtp_sent"] > 100, summary
    [recorded] = [e for e in call.events if isinstance(e, CallRecorded)]
    rate, channels, frames = read_wav(Path(recorded.path))        # the caller left, the agent right (8 kHz line)
    caller_side, agent_side = np.abs(frames[:, 0].astype(np.int32)), np.abs(frames[:, 1].astype(np.int32))
    assert (rate, channels) == (16_000, 2) and recorded.seconds == pytest.approx(len(frames) / rate, abs=1e-3)
    assert np.flatnonzero(caller_side > 1000)[0] < np.flatnonzero(agent_side > 1000)[0]   # asked, then answered


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


@pytest.fixture(scope="module")
def hold_audio(tmp_path_factory):
    """The field case's layout (hold_question.wav): 0.5 s silence, the question, silence; then, inside the
    hold (3.0–6.0 s), music on hold that speaks — from 3.3 s, so it must not become a turn."""
    tmp = tmp_path_factory.mktemp("sip_hold_audio")
    question = speak("What is the capital of France?")
    moh = speak("Please hold. Your call is important to us.")
    gap = 3.3 - 0.5 - len(question) / 16000
    assert gap > 0.5 and 3.3 + len(moh) / 16000 < 5.8, "the recorded phrases no longer fit the hold window"
    return ulaw_question(tmp, "hold_question", 0.5, question, gap, moh, 3.0)[0]


@pytest.mark.parametrize("hold_ms, hold, on_resume", [
    (3000, "sendonly", "continue"),     # the field case: hold at 3.0 s, resume at 6.0 s
    (3000, "sendonly", "drop"),
    (None, "inactive", "continue"),     # hold once 0.5 s of the answer has gone out, resume 3 s later
    (None, "0.0.0.0", "drop"),          # RFC 2543 style
])
async def test_hold_pauses_the_agents_audio_and_resume_continues_or_drops(config, engines, audio, hold_audio, tmp_path,
                                                                          hold_ms, hold, on_resume):
    mid_reply = hold_ms is None
    ulaw = audio["question"][0] if mid_reply else hold_audio
    scenario = scenario_hold(ulaw, hold_ms=hold_ms, resume_ms=3000 if mid_reply else 6000, hold=hold)
    async with sip_service(config, engines, sip={"on_resume": on_resume}) as (service, observer):
        peer = sipp(tmp_path, scenario, service.address)
        sends: list[tuple[bool, bool, int]] = []   # per 20 ms tick: (held, agent audio pulled, RTP packets sent)
        at_hold: list[int] = []                    # agent audio queued when the hold came (samples)
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                dialogs = list(service.uas.dialogs.values())
                if dialogs and dialogs[0].call is not None and dialogs[0].call.endpoint is not None:
                    break
            else:
                raise AssertionError("the call was not answered: " + peer.tail())
            sip_call = dialogs[0].call
            endpoint, agent = sip_call.endpoint, sip_call.agent
            send, agent_hold = endpoint.send, agent.hold

            def recording_send(pcm):
                send(pcm)
                sends.append((sip_call.held, pcm is not None, endpoint.stats.sent))

            def recording_hold():
                at_hold.append(agent.playout.queued_samples + (agent._responder.reply is not None))
                agent_hold()

            endpoint.send, agent.hold = recording_send, recording_hold
            if mid_reply:   # the caller puts the agent on hold in the middle of its answer
                for _ in range(1200):
                    if sum(pulled for _, pulled, _ in sends) >= 25:
                        break
                    await asyncio.sleep(0.05)
                await poke_when(service, observer, lambda events: True)
            await poke_when(service, observer, lambda events: any(isinstance(e, CallResumed) for e in events)
                            and any(isinstance(e, TurnFinished) for e in events))
            rc = await peer.wait(40)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()
        (record,) = await observer.wait_ended()
    kinds = record.kinds()
    assert kinds.count("call_held") == 1 and kinds.count("call_resumed") == 1, kinds
    assert kinds.index("call_held") < kinds.index("call_resumed")
    (turn,) = record.turns                                           # the music on hold was no turn
    assert {"capital", "france"} <= words(turn.transcript), turn.transcript
    finals = [e.text for e in record.events if isinstance(e, TranscriptEvent) and e.final]
    assert not any({"hold", "important"} & words(t) for t in finals), finals
    assert at_hold and at_hold[0] > 0, "the agent was not answering when the hold came (too slow a machine?)"
    assert not mid_reply or at_hold[0] > 1, "nothing left to play at the hold"
    during = [s for s in sends if s[0]]
    assert during, "no tick while held"
    assert not any(pulled for _, pulled, _ in during), "agent audio was pulled during the hold"
    assert during[-1][2] - during[0][2] <= 1, "RTP went out during the hold"
    resumed_at = max(i for i, s in enumerate(sends) if s[0]) + 1
    after = sum(pulled for _, pulled, _ in sends[resumed_at:])
    before = sum(pulled for held, pulled, _ in sends[:resumed_at] if not held)
    (held_event,) = [e for e in record.events if isinstance(e, CallHeld)]
    (resumed,) = [e for e in record.events if isinstance(e, CallResumed)]
    print(f"| {hold_ms or 'mid-reply'} | {hold} | {on_resume} | {before * 0.02:.2f} | {sum(p for _, p, _ in during) * 0.02:.2f} | {after * 0.02:.2f} | "
          f"{resumed.dropped_s:.2f} | {turn.reply!r} |")   # the measurement table (pytest -s)
    assert held_event.kind == "call_held"
    if on_resume == "continue":
        assert after > 0, "nothing was left after the resume"
        assert resumed.dropped_s == 0 and turn.ledger.notes["interrupted"] is False
        assert turn.reply == " ".join(e.text for e in record.events if isinstance(e, AgentSpeech))
    else:
        # dropped: what was heard before the hold, and nothing after (nothing at all if it had not begun)
        assert after == 0 and turn.ledger.notes["interrupted"] is True
        spoken = " ".join(e.text for e in record.events if isinstance(e, AgentSpeech))
        assert spoken.startswith(turn.reply) and (len(turn.reply) < len(spoken) or spoken == "")
        assert before > 0 or turn.reply == "", (turn.reply, before)   # heard words are in proportion to audio played
        assert resumed.dropped_s > 0
