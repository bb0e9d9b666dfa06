"""Turn-taking with the real engines: barge-in, false interruptions, speculation, echo.

A scripted caller (sub300/testing/scripted_caller.py) talks to a Conversation in real time and
reacts to what the agent does, so these tests hold on a slow machine too.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from sub300.agent.events import AgentSpeech, TurnFinished
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure
from .speech import speak

pytestmark = pytest.mark.slow   # real engines, real time: the fast tier is test_conversation_fast.py

STORY = "Tell me a long story about a brave knight and a dragon."


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@pytest.fixture(scope="module")
def story():
    return speak(STORY)


@pytest.fixture
def configured(config):
    return lambda **sections: configure(config, **{"stt__partial_interval_ms": 0, **sections})


async def test_barge_in_stops_the_agent_and_keeps_only_what_was_heard(engines, configured, story):
    interruption = speak("Stop. What is the capital of France?")  # made before: TTS here would stall the clock
    caller = ScriptedCaller(engines, configured())
    try:
        await caller.silence(0.5)
        await caller.say(story)
        # let the agent speak a little: 1 s of its audio played, and speaking now.  (A fixed 1 s of silence
        # could land in a gap between the 3-word first piece and the next, which on two cores is not always
        # synthesised in time: then nothing plays and there is nothing to barge in on.)
        playout = caller.playout
        await caller.wait_until(lambda: playout.played_total >= playout.sample_rate and playout.audible, 20)
        await caller.say(interruption)
        await caller.until_idle()
    finally:
        await caller.close()
    finished = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert [f.turn for f in finished] == [1, 2]
    first, second = finished
    assert first.ledger.notes["interrupted"] is True
    spoken = " ".join(e.text for e in caller.events if isinstance(e, AgentSpeech) and e.turn == 1)
    heard = caller.conversation.history.exchanges[0][1]
    assert heard == first.reply
    # History keeps a strict prefix of what was generated: what the caller heard.
    assert 0 < len(words(heard)) < len(words(spoken)), (heard, spoken)
    assert words(spoken)[: len(words(heard))] == words(heard)
    # The agent fell silent within 100 ms of the caller's voice at the server.
    reactions = caller.conversation.barge_in_reactions
    assert reactions and max(reactions) <= 0.1, reactions
    # No audio of the cancelled turn after the interruption: silence until turn 2 speaks.
    second_start = second.ledger.marks["first_audio_out"]
    silent_at = caller.conversation.barge_ins[0][1]
    # (frames are stamped with their tick; first_audio_out is read a moment later in the same tick)
    stray = [at for at, f in caller.agent_audio if silent_at <= at < second_start - 0.02 and np.abs(f).max() > 0]
    assert stray == [], f"{len(stray)} frames of the interrupted reply played after the barge-in"
    assert "france" in words(second.transcript)


async def test_a_cough_does_not_stop_the_agent(engines, configured, story):
    rng = np.random.default_rng(7)
    cough = (rng.normal(0, 6000, 2400) * np.hanning(2400)).astype(np.int16)  # 150 ms burst
    caller = ScriptedCaller(engines, configured())
    try:
        await caller.silence(0.5)
        await caller.say(story)
        playout = caller.playout   # 0.8 s of the reply played and speaking now (not in a gap between pieces)
        await caller.wait_until(lambda: playout.played_total >= 0.8 * playout.sample_rate and playout.audible, 20)
        await caller.say(cough)
        await caller.until_idle()
    finally:
        await caller.close()
    finished = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert len(finished) == 1 and finished[0].ledger.notes["interrupted"] is False
    assert caller.conversation.false_interruptions == 1
    spoken = " ".join(e.text for e in caller.events if isinstance(e, AgentSpeech))
    assert finished[0].reply == spoken  # the whole reply was played and kept


async def test_speculation_hit_starts_the_answer_inside_the_hangover(engines, configured):
    # A long hangover makes sure the early transcript is ready before the turn ends.
    question = speak("What is the capital of France?")
    caller = ScriptedCaller(engines, configured(vad__hangover_ms=12000))
    try:
        await caller.silence(0.5)
        await caller.say(question)
        await caller.wait_until(lambda: caller.conversation.speculating, timeout=11)
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    marks = turn.ledger.marks
    assert turn.ledger.notes["speculative"] is True
    assert marks["llm_start"] < marks["endpoint"]
    assert "llm_before_endpoint" in turn.ledger.overlaps_ms()
    assert sum(turn.ledger.stages_ms().values()) == pytest.approx(turn.ledger.voice_to_voice_ms)


async def test_speculation_miss_answers_only_the_whole_sentence(engines, configured):
    first_half, second_half = speak("What is the capital of"), speak("Germany?")
    caller = ScriptedCaller(engines, configured(vad__hangover_ms=12000))
    try:
        await caller.silence(0.5)
        await caller.say(first_half)
        # a pause shorter than the hangover, long enough for the agent to start answering the half
        await caller.wait_until(lambda: caller.conversation.speculating, timeout=11)
        await caller.silence(0.3)
        await caller.say(second_half)
        await caller.silence(0.3)
        await caller.until_idle()
    finally:
        await caller.close()
    finished = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert len(finished) == 1
    assert "germany" in words(finished[0].transcript)
    assert finished[0].ledger.notes.get("speculation_wasted", 0) >= 1
    # Nothing was said before the caller finished the sentence.
    speech_end = finished[0].ledger.marks["speech_end"]
    assert all(at > speech_end for at, f in caller.agent_audio if np.abs(f).max() > 0)


def perfect_echo(frame: np.ndarray) -> np.ndarray:
    """A line that sends the agent's voice straight back (no echo canceller), 60 ms late."""
    return frame.copy()


@pytest.mark.parametrize("echo_guard", [True, False])
async def test_echo_of_the_agent_does_not_interrupt_it(engines, configured, story, echo_guard):
    caller = ScriptedCaller(engines, configured(interrupt__echo_guard=echo_guard), echo=perfect_echo)
    conversation = caller.conversation

    def finished() -> list[TurnFinished]:
        return [e for e in caller.events if isinstance(e, TurnFinished)]

    def heard_itself() -> bool:
        return (conversation.false_interruptions > 0 or len(finished()) > 1
                or any(f.ledger.notes.get("interrupted") for f in finished()))

    try:
        await caller.silence(0.5)
        await caller.say(story)
        await caller.wait_until(lambda: caller.playout.audible)
        if echo_guard:
            await caller.until_idle(timeout=90)
        else:
            # The control: without the guard the agent reacts to its own voice
            # (and may go on answering itself, so do not wait for it to finish).
            await caller.wait_until(heard_itself, timeout=60)
    finally:
        await caller.close()
    if echo_guard:
        assert not heard_itself(), (conversation.false_interruptions, [f.reply for f in finished()])
        assert conversation.echo_frames > 0
        assert len(finished()) == 1 and finished()[0].reply


async def test_keypad_digits_become_a_turn(engines, configured):
    caller = ScriptedCaller(engines, configured())
    try:
        await caller.silence(0.3)
        for digit in "42#":
            caller.conversation.push_dtmf(digit)
        await caller.silence(0.1)
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert turn.ledger.notes["keypad"] == "42"
    assert "4 2" in turn.transcript and turn.reply
