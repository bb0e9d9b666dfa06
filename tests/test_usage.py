"""Usage metering: what each turn report and the call's end carry, on fake engines and virtual time.

The fakes' rules: `FakeStt` reports the seconds of audio it was given, `FakeLlm`
counts words as tokens, `FakeTts` is given the spoken form of each piece.  The
totals are counted here from what the caller fed and pulled and what the fakes
were asked, independently of the meter.
"""
from __future__ import annotations

import asyncio

import pytest

from sub300.agent.events import CallUsage, TurnDiscarded, TurnFailed, TurnFinished
from sub300.agent.ledger import TurnLedger
from sub300.agent.usage import (
    AGENT_AUDIO_S,
    CALLER_AUDIO_S,
    LLM_COMPLETION_TOKENS,
    LLM_PROMPT_TOKENS,
    STT_AUDIO_S,
    TTS_CHARS,
    USAGE_QUANTITIES,
    add_usage,
)
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
pytestmark = pytest.mark.looptime

TOKENS = ["Sure", ".", " Paris", " is", " lovely", "."]


def engines(text="What is the capital of France?", *, tokens=TOKENS, tts_ms=500.0):
    return fake_engines(stt=FakeStt(text, delay_s=0.105), llm=FakeLlm(tokens, first_token_s=0.045, per_token_s=0.01),
                        tts=FakeTts(delay_s=0.033, ms_per_piece=tts_ms))


class Counted:
    """A ScriptedCaller whose frames fed to the conversation are counted."""

    def __init__(self, eng, config) -> None:
        self.caller = ScriptedCaller(eng, config, clock=asyncio.get_running_loop().time)
        self.fed = 0
        push = self.caller.conversation.push_frame

        def counted(frame) -> None:
            self.fed += 1
            push(frame)

        self.caller.conversation.push_frame = counted   # type: ignore[method-assign]

    def reports(self) -> list[dict[str, float]]:
        """Every report's usage, in order: the turns' ledgers, then the call's end."""
        out = []
        for event in self.caller.events:
            if isinstance(event, TurnFinished | TurnFailed | TurnDiscarded):
                assert event.ledger is not None
                out.append(event.ledger.usage)
            elif isinstance(event, CallUsage):
                out.append(event.usage)
        return out


def summed(reports: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for usage in reports:
        add_usage(total, usage)
    return total


def words(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


@pytest.fixture
def configured(config):
    return lambda **sections: configure(config, **{"stt__partial_interval_ms": 0, "stt__tail_ms": 0, **sections})


async def test_each_turn_reports_its_usage_and_the_reports_add_up_to_the_call(configured):
    eng = engines()
    call = Counted(eng, configured(llm__speculate=False))
    caller = call.caller
    try:
        for seed in (1, 2):
            await caller.silence(0.5)
            await caller.say(speech(1.0, seed=seed))
            await caller.until_idle()
        await caller.silence(0.3)
    finally:
        await caller.close()
    first, second = [e for e in caller.events if isinstance(e, TurnFinished)]
    (end,) = [e for e in caller.events if isinstance(e, CallUsage)]
    assert caller.events[-1] is end                          # the last thing the conversation says
    for turn in (first, second):
        usage = turn.ledger.usage
        assert set(usage) == set(USAGE_QUANTITIES)           # every quantity is in each turn's report
        assert usage[LLM_COMPLETION_TOKENS] == 4             # "Sure. Paris is lovely.": 4 words, the fake's rule
        assert usage[TTS_CHARS] == len("Sure.") + len("Paris is lovely.")
        assert usage[AGENT_AUDIO_S] == pytest.approx(1.0)    # two 500 ms pieces, played before TurnFinished
    # the prompt: the system prompt, the question, and from turn 2 on the first exchange
    assert [first.ledger.usage[LLM_PROMPT_TOKENS], second.ledger.usage[LLM_PROMPT_TOKENS]] == [
        words(r) for r in eng.llm.requests]
    total = summed(call.reports())
    assert total[CALLER_AUDIO_S] == pytest.approx(call.fed * 0.020)      # every frame fed, speech or not
    assert total[AGENT_AUDIO_S] == pytest.approx(len(caller.agent_audio) * 0.020)   # every frame pulled
    assert total[STT_AUDIO_S] == pytest.approx(sum(seconds for _at, seconds in eng.stt.calls))
    assert total[TTS_CHARS] == sum(len(piece) for piece in eng.tts.pieces)
    assert total == pytest.approx(caller.conversation.meter.total)
    # the call's end carries the caller audio after the last report (0.3 s and the idle wait), nothing else
    assert set(end.usage) == {CALLER_AUDIO_S}


async def test_a_barge_in_counts_only_the_agent_audio_played(configured):
    tokens = ["One", " two", " three", " four", ".", " Five", " six", " seven", " eight", "."]
    eng = engines(tokens=tokens, tts_ms=1000.0)
    call = Counted(eng, configured(tts__first_piece_max_words=6))
    caller = call.caller
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.wait_until(lambda: caller.playout.audible)
        await caller.silence(1.5)                     # into the second piece
        await caller.say(speech(0.6, seed=2))
        await caller.until_idle()
    finally:
        await caller.close()
    first, second = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert first.ledger.notes["interrupted"] is True
    played = len(caller.agent_audio) * 0.020
    # the first reply was synthesized whole (2 s) but only 1.56 s of it was played before the barge-in
    assert first.ledger.usage[AGENT_AUDIO_S] == pytest.approx(1.56)
    assert second.ledger.usage[AGENT_AUDIO_S] == pytest.approx(2.0)
    assert summed(call.reports())[AGENT_AUDIO_S] == pytest.approx(played) == pytest.approx(3.56)
    assert summed(call.reports())[CALLER_AUDIO_S] == pytest.approx(call.fed * 0.020)


async def test_a_wasted_speculation_is_billed_and_a_discarded_turn_reports_its_transcriptions(configured):
    from sub300.testing.fakes import voiced_seconds

    def text(audio):   # the early final on the first part, then the caller goes on: the speculation is wasted
        return "What is the capital of Germany?" if voiced_seconds(audio) > 0.9 else "What is the capital of"

    eng = engines(text)
    call = Counted(eng, configured())
    caller = call.caller
    try:
        await caller.silence(0.5)
        await caller.say(speech(0.6))
        await caller.silence(0.16)                # a pause: the early final and a speculative reply start
        await caller.say(speech(0.6, seed=4))
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert turn.ledger.notes.get("speculation_wasted", 0) >= 1
    assert len(eng.llm.requests) == 2
    # both requests' prompts are billed to the turn: work done is billed
    assert turn.ledger.usage[LLM_PROMPT_TOKENS] == sum(words(r) for r in eng.llm.requests)

    silent = engines("")                          # a transcript without words: the turn is discarded
    call = Counted(silent, configured())
    try:
        await call.caller.silence(0.5)
        await call.caller.say(speech(1.0))
        await call.caller.until_idle()
    finally:
        await call.caller.close()
    (discarded,) = [e for e in call.caller.events if isinstance(e, TurnDiscarded)]
    assert discarded.ledger is not None
    assert discarded.ledger.usage[STT_AUDIO_S] == pytest.approx(sum(s for _at, s in silent.stt.calls))
    assert LLM_PROMPT_TOKENS not in discarded.ledger.usage


def test_the_ledger_keeps_its_usage_through_a_dict():
    ledger = TurnLedger(3, usage={STT_AUDIO_S: 1.25, LLM_PROMPT_TOKENS: 40.0})
    assert TurnLedger.from_dict(ledger.to_dict()).usage == ledger.usage
    assert TurnLedger.from_dict({"turn": 1}).usage == {}


def test_the_meter_puts_late_work_in_the_next_report_and_what_was_never_reported_in_the_call_end():
    from sub300.agent.metering import CallMeter

    played = [0]
    meter = CallMeter(lambda: played[0], agent_rate=48_000, caller_rate=16_000)
    meter.charge(1, {STT_AUDIO_S: 1.0})
    meter.caller_audio(16_000)
    played[0] = 48_000
    first = meter.report_turn(1)
    meter.charge(1, {STT_AUDIO_S: 0.5})       # a partial of turn 1 that returned after its report
    meter.charge(2, {TTS_CHARS: 10})
    meter.charge(3, {TTS_CHARS: 5})           # turn 3 is never reported (the call ends while it is spoken)
    meter.charge(None, {TTS_CHARS: 0})        # nothing: not in any report
    played[0] = 72_000                        # agent audio still playing after turn 1's report
    second = meter.report_turn(2)
    end = meter.close()
    assert first == {STT_AUDIO_S: 1.0, CALLER_AUDIO_S: 1.0, AGENT_AUDIO_S: 1.0}
    assert second == {STT_AUDIO_S: 0.5, TTS_CHARS: 10.0, AGENT_AUDIO_S: 0.5}
    assert end == {TTS_CHARS: 5.0}
    assert summed([first, second, end]) == meter.total
    with pytest.raises(KeyError):
        meter.charge(1, {"minutes": 1.0})
