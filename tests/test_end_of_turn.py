"""Adaptive end of turn (agent/end_of_turn.py) on fake engines and virtual time.

Timeline (as in tests/test_conversation_fast.py): silence to 0.50, speech to
1.50 = the true end of speech; the first silent frame arrives at 1.52 (the
pause: the model is asked then).  Hangovers count from 1.50 and expire on
the 20 ms frame grid: 150 ms at 1.66, 250 ms at 1.76, 800 ms at 2.30.
"""
from __future__ import annotations

import asyncio
import logging

import pytest

from sub300.agent.end_of_turn import ends_mid_phrase
from sub300.agent.events import TurnFinished
from sub300.models.protocols import ModelError
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, FakeTurnModel, fake_engines, speech, voiced_seconds
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
pytestmark = pytest.mark.looptime

SPEECH_END = 1.50
MODEL_S = 0.033


def approx(t: float):
    return pytest.approx(t, abs=2e-6)


@pytest.fixture
def adaptive(config):
    return configure(config, stt__partial_interval_ms=0, stt__tail_ms=0, turn__detector="smart-turn",
                     turn__complete_hangover_ms=150, turn__incomplete_hangover_ms=800, turn__threshold=0.5)


async def one_turn(turn_model: FakeTurnModel, config, text: str = "What is the capital of France?",
                   script=((0.5, None), (1.0, 0))) -> list[TurnFinished]:
    eng = fake_engines(stt=FakeStt(text, delay_s=0.105), llm=FakeLlm(["Sure."], first_token_s=0.045),
                       tts=FakeTts(delay_s=0.033), turn=turn_model)
    caller = ScriptedCaller(eng, config, clock=asyncio.get_running_loop().time)
    try:
        for seconds, seed in script:
            await (caller.silence(seconds) if seed is None else caller.say(speech(seconds, seed=seed)))
        await caller.until_idle()
    finally:
        await caller.close()
    return [e for e in caller.events if isinstance(e, TurnFinished)]


async def test_a_complete_turn_ends_after_the_short_hangover(adaptive):
    model = FakeTurnModel(0.9, delay_s=MODEL_S)
    (turn,) = await one_turn(model, adaptive)
    marks, notes = turn.ledger.marks, turn.ledger.notes
    assert marks["speech_end"] == approx(SPEECH_END) and marks["endpoint"] == approx(SPEECH_END + 0.16)
    assert model.calls[0][0] == approx(1.52)                    # scored at the silence onset
    assert notes["turn_p"] == 0.9 and notes["hangover_ms"] == 150 and notes["hangover_by"] == "model"
    assert notes["turn_model_ms"] == notes["turn_decision_ms"] == pytest.approx(MODEL_S * 1000)


async def test_an_incomplete_turn_waits_the_long_hangover(adaptive):
    (turn,) = await one_turn(FakeTurnModel(0.2, delay_s=MODEL_S), adaptive)
    assert turn.ledger.marks["endpoint"] == approx(SPEECH_END + 0.80)
    assert turn.ledger.notes["hangover_ms"] == 800 and turn.ledger.notes["hangover_by"] == "model"
    # the early final and the speculative reply ran inside the long hangover: the answer was ready
    assert turn.ledger.notes["early_final"] is True and turn.ledger.notes["speculative"] is True
    assert turn.ledger.marks["first_audio_out"] <= SPEECH_END + 0.80 + 0.02 + 1e-6


async def test_a_transcript_ending_mid_phrase_extends_a_complete_sounding_turn(adaptive):
    # the early final (1.52 + 0.105 = 1.625) comes before the short hangover ends (1.66)
    (turn,) = await one_turn(FakeTurnModel(0.9, delay_s=MODEL_S), adaptive, text="Please enter your number followed by the")
    assert turn.ledger.marks["endpoint"] == approx(SPEECH_END + 0.80)
    assert turn.ledger.notes["turn_p"] == 0.9 and turn.ledger.notes["hangover_by"] == "transcript"


async def test_a_late_decision_ends_the_turn_at_once(adaptive):
    (turn,) = await one_turn(FakeTurnModel(0.9, delay_s=0.2), adaptive)
    # decided at 1.52 + 0.2 = 1.72, after the 150 ms hangover had elapsed (1.66): between two frames
    assert turn.ledger.marks["endpoint"] == approx(1.72)
    assert turn.ledger.notes["turn_decision_ms"] == pytest.approx(200.0)


async def test_a_failing_model_falls_back_to_the_vad_hangover_visibly(adaptive, caplog):
    model = FakeTurnModel(error=ModelError("onnx exploded"), delay_s=MODEL_S)
    with caplog.at_level(logging.WARNING, logger="sub300.agent.end_of_turn"):
        (turn,) = await one_turn(model, adaptive)
    assert turn.ledger.marks["endpoint"] == approx(SPEECH_END + 0.26)     # vad.hangover_ms = 250
    notes = turn.ledger.notes
    assert notes["turn_model_error"] == "model" and notes["hangover_by"] == "vad: model failed"
    assert "turn 1: turn model fake-turn failed (onnx exploded)" in caplog.text


async def test_speech_resumed_inside_the_long_hangover_keeps_one_turn(adaptive):
    def sounds_complete(audio):
        return 0.9 if voiced_seconds(audio) > 0.9 else 0.1

    model = FakeTurnModel(sounds_complete, delay_s=MODEL_S)
    turns = await one_turn(model, adaptive, script=((0.5, None), (0.6, 0), (0.5, None), (0.4, 1)))
    (turn,) = turns
    # speech 0.5-1.1, a 500 ms hesitation, speech 1.6-2.0: the second pause ends the turn after 150 ms
    assert turn.ledger.marks["speech_start"] == approx(0.5) and turn.ledger.marks["speech_end"] == approx(2.0)
    assert turn.ledger.marks["endpoint"] == approx(2.16)
    assert turn.ledger.notes["turn_pauses"] == 2 and len(model.calls) == 2


async def test_without_a_turn_model_the_vad_hangover_ends_turns(adaptive, caplog):
    with caplog.at_level(logging.WARNING, logger="sub300.agent.conversation"):
        eng = fake_engines(stt=FakeStt("Hi.", delay_s=0.105))
        caller = ScriptedCaller(eng, adaptive, clock=asyncio.get_running_loop().time)
        await caller.close()
    assert "no turn model is loaded" in caplog.text
    assert caller.conversation.end_of_turn is None


@pytest.mark.parametrize(("text", "mid"), [
    ("What is the capital of", True), ("Please enter your password followed by the.", True),
    ("I want to go, ", True), ("Well, um", True), ("What is it for?", False),
    ("What is the capital of France?", False), ("Thank you.", False), ("", False),
])
def test_ends_mid_phrase(text, mid):
    assert ends_mid_phrase(text) is mid
