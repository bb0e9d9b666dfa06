"""Call limits (agent/call_limits.py) on fake engines and virtual time: silent callers and endless calls end.

The caller is `ScriptedCaller` on the loop's clock (looptime), as in
test_conversation_fast.py; FakeTts speaks every text as 500 ms of tone after
33 ms, so the goodbye's length is known exactly.
"""
from __future__ import annotations

import asyncio
import copy
import shutil

import numpy as np
import pytest

from sub300.agent.call_limits import INACTIVITY, MAX_DURATION, CallLimits
from sub300.agent.events import AgentSpeech, HangupRequested, TurnFinished
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")

TTS_S, TONE_S = 0.033, 0.5


def limited(config, *, inactivity: float, max_duration: float = 0.0):
    c = copy.deepcopy(config)
    c.stt.partial_interval_ms = 0
    c.call.inactivity_timeout_s = inactivity
    c.call.max_duration_s = max_duration
    return c


def engines(tokens=("Sure", ".", " Paris", " is", " lovely", ".")):
    return fake_engines(stt=FakeStt("What is the capital of France?", delay_s=0.105),
                        llm=FakeLlm(list(tokens), first_token_s=0.045, per_token_s=0.01),
                        tts=FakeTts(delay_s=TTS_S, ms_per_piece=TONE_S * 1000))


def hangups(caller: ScriptedCaller) -> list[HangupRequested]:
    return [e for e in caller.events if isinstance(e, HangupRequested)]


def audio_after(caller: ScriptedCaller, t: float) -> float:
    """Seconds of loud agent audio pulled at or after clock time ``t``."""
    loud = [pcm for at, pcm in caller.agent_audio if at >= t and np.abs(pcm).max() > 1000]
    return sum(len(p) for p in loud) / 16000


# ------------------------------------------------------------ the clocks alone
def test_limits_fire_at_their_deadlines_and_zero_switches_them_off():
    limits = CallLimits(inactivity_s=60, max_duration_s=3600, started=100.0, inactivity_goodbye="bye")
    assert limits.expired(159.9) is None and limits.next_deadline() == 160.0
    limits.activity(150.0)
    assert limits.expired(209.9) is None and limits.next_deadline() == 210.0
    reached = limits.expired(210.0)
    assert reached is not None and reached.reason == INACTIVITY and reached.goodbye == "bye"
    limits.activity(3650.0)
    assert limits.expired(3700.0).reason == MAX_DURATION   # the length wins whatever the activity
    off = CallLimits(inactivity_s=0, max_duration_s=0, started=0.0)
    assert off.expired(1e9) is None and off.next_deadline() is None
    limits.activity(10.0)   # an older activity does not move the clock back
    assert limits.last_activity == 3650.0


# ------------------------------------------------------------ a conversation
@pytest.mark.looptime
async def test_a_silent_caller_hears_the_goodbye_and_the_call_hangs_up(config):
    fakes = engines()
    caller = ScriptedCaller(fakes, limited(config, inactivity=5.0), clock=asyncio.get_running_loop().time)
    try:
        await caller.wait_until(lambda: bool(hangups(caller)), timeout=30)
        (hangup,) = hangups(caller)
        assert hangup.reason == INACTIVITY
        assert caller.conversation.ended_by is not None and caller.conversation.ended_by.at == pytest.approx(5.0, abs=0.021)
        assert fakes.tts.pieces == [config.call.inactivity_goodbye]
        assert [e.text for e in caller.events if isinstance(e, AgentSpeech)] == [config.call.inactivity_goodbye]
        # the hang-up comes once the whole goodbye has been pulled: 5 s + TTS + 500 ms of tone
        assert audio_after(caller, 5.0) == pytest.approx(TONE_S, abs=0.021)
        assert caller.clock() == pytest.approx(5.0 + TTS_S + TONE_S, abs=0.05)
        # the caller speaking now changes nothing: the call is ending
        await caller.say(speech(1.0))
        await caller.silence(1.0)
        assert len(hangups(caller)) == 1 and not [e for e in caller.events if isinstance(e, TurnFinished)]
    finally:
        await caller.close()
    assert not caller.conversation._farewell.all_tasks()


@pytest.mark.looptime
async def test_inactivity_counts_from_the_end_of_the_last_exchange(config):
    caller = ScriptedCaller(engines(), limited(config, inactivity=5.0), clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(3.0)
        await caller.say(speech(1.0))           # 3.0–4.0: a question, answered with ~1 s of audio
        await caller.until_idle()
        idle_at = caller.clock()
        assert [e for e in caller.events if isinstance(e, TurnFinished)] and not hangups(caller)
        await caller.wait_until(lambda: bool(hangups(caller)), timeout=30)
        assert caller.conversation.ended_by.at == pytest.approx(idle_at + 5.0, abs=0.05)
    finally:
        await caller.close()


@pytest.mark.looptime
async def test_the_maximum_length_cuts_a_talkative_call_with_its_own_goodbye(config):
    fakes = engines(tokens=["Well", "."] + [" and", " so", " on", "."] * 40)   # a long reply
    c = limited(config, inactivity=5.0, max_duration=8.0)
    caller = ScriptedCaller(fakes, c, clock=asyncio.get_running_loop().time)
    try:
        for _ in range(3):                      # never silent for 5 s
            await caller.silence(0.5)
            await caller.say(speech(1.5))
        await caller.wait_until(lambda: bool(hangups(caller)), timeout=30)
        (hangup,) = hangups(caller)
        assert hangup.reason == MAX_DURATION
        assert caller.conversation.ended_by.at == pytest.approx(8.0, abs=0.021)
        assert fakes.tts.pieces[-1] == c.call.max_duration_goodbye
        assert caller.conversation.playout.idle and not caller.conversation._tasks.all_tasks()
    finally:
        await caller.close()


@pytest.mark.looptime
async def test_the_limits_switched_off_keep_a_silent_call_open(config):
    caller = ScriptedCaller(engines(), limited(config, inactivity=0.0, max_duration=0.0),
                            clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(90.0)    # beyond the default 60 s
        assert not hangups(caller) and caller.conversation.ended_by is None
    finally:
        await caller.close()


@pytest.mark.looptime
async def test_a_transport_timer_ends_a_call_whose_frames_stopped(config):
    """SIP on hold or RTP gone: no frames, so the transport's own timer runs the check."""
    caller = ScriptedCaller(engines(), limited(config, inactivity=5.0), clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(1.0)
        await asyncio.sleep(3.0)
        assert caller.conversation.check_limits() is None
        await asyncio.sleep(1.5)
        reached = caller.conversation.check_limits()
        assert reached is not None and reached.reason == INACTIVITY
        assert caller.conversation.check_limits() is None    # once
        await caller.wait_until(lambda: bool(hangups(caller)), timeout=10)
    finally:
        await caller.close()


# ------------------------------------------------------------ over SIP (sipp on 127.0.0.1, fake engines)
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sipp") is None or shutil.which("sox") is None, reason="needs sipp and sox")
async def test_a_silent_sip_caller_hears_the_goodbye_and_gets_the_agents_bye(config, tmp_path):
    """sipp plays 1 s of silence and then sends no RTP at all: the SIP call feeds silence for the gap,
    the inactivity limit fires, the goodbye plays, and the agent sends BYE (which sipp waits for)."""
    from .test_sip_support import scenario_call, sip_service, sipp, sipp_errors, ulaw_question

    c = limited(config, inactivity=2.0)
    silence, _ = ulaw_question(tmp_path, "silence", 1.0)
    async with sip_service(c, engines()) as (service, observer):
        peer = sipp(tmp_path, scenario_call(silence, timeout_ms=20_000), service.address)
        try:
            rc = await peer.wait(30)
        finally:
            peer.stop()
        assert rc == 0, sipp_errors(tmp_path) + peer.tail()   # the agent's BYE arrived and was answered
        (call,) = await observer.wait_ended()
    assert call.ended == "agent hung up"
    assert [e.text for e in call.events if isinstance(e, AgentSpeech)] == [c.call.inactivity_goodbye]
    assert [e.reason for e in call.events if isinstance(e, HangupRequested)] == [INACTIVITY]
    assert service.uas.ended_calls[-1]["rtp_sent"] > 0


@pytest.mark.looptime
async def test_a_call_on_hold_is_not_inactive(config):
    caller = ScriptedCaller(engines(), limited(config, inactivity=5.0), clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(1.0)
        caller.conversation.hold()
        await caller.silence(10.0)              # music on hold, or nothing: the caller comes back
        assert not hangups(caller)
        caller.conversation.unhold(drop_rest=False)
        resumed = caller.clock()
        await caller.wait_until(lambda: bool(hangups(caller)), timeout=30)
        assert caller.conversation.ended_by.at == pytest.approx(resumed + 5.0, abs=0.05)
    finally:
        await caller.close()
