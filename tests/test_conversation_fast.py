"""A Conversation on fake engines and virtual time: exact ledgers in milliseconds of wall time.

The caller is `ScriptedCaller` on the event loop's clock; looptime fast-forwards
that clock whenever the loop would sleep, so every 20 ms tick, engine delay
and hangover happens in virtual time, deterministically.  The fakes' delays
are chosen off the 20 ms tick grid so no two things happen at one instant.

Timeline of a plain turn (seconds on the loop's clock, the caller's first tick at 0.02):
silence to 0.50, speech 0.50–1.50 (50 frames), speech_end = 1.50, the
250 ms hangover expires on the 13th silent frame: endpoint = 1.76.
"""
from __future__ import annotations

import asyncio
import copy

import pytest

from sub300.agent.events import BargeInEvent, HangupRequested, StateChanged, TranscriptEvent, TurnFailed, TurnFinished
from sub300.models.protocols import ModelError
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech, voiced_seconds
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
pytestmark = pytest.mark.looptime

STT_S, FIRST_TOKEN_S, TOKEN_S, TTS_S = 0.105, 0.045, 0.01, 0.033
SPEECH_END, ENDPOINT = 0.50 + 1.00, 0.50 + 1.00 + 0.26
TOKENS = ["Sure", ".", " Paris", " is", " lovely", "."]   # first piece "Sure." is cut when " Paris" arrives


def tick_after(t: float) -> float:
    """The first 20 ms tick at or after ``t`` (when the caller pulls agent audio)."""
    return round(-(-round(t, 6) // 0.02) * 0.02, 6)


def approx(t: float):
    return pytest.approx(t, abs=2e-6)


@pytest.fixture
def configured(config):
    # the timings below count from the first silent frame (tail: tests/test_quiet_caller.py)
    return lambda **sections: configure(config, **{"stt__partial_interval_ms": 0, "stt__tail_ms": 0, **sections})


def engines(text="What is the capital of France?", *, tokens=TOKENS, tts_ms=500.0, **stt):
    return fake_engines(stt=FakeStt(text, delay_s=STT_S, **stt),
                        llm=FakeLlm(tokens, first_token_s=FIRST_TOKEN_S, per_token_s=TOKEN_S),
                        tts=FakeTts(delay_s=TTS_S, ms_per_piece=tts_ms))


def caller_on(engines, config, **kw) -> ScriptedCaller:
    return ScriptedCaller(engines, config, clock=asyncio.get_running_loop().time, **kw)


def of(caller: ScriptedCaller, kind):
    return [e for e in caller.events if isinstance(e, kind)]


async def one_question(caller: ScriptedCaller, seconds: float = 1.0) -> None:
    try:
        await caller.silence(0.5)
        await caller.say(speech(seconds))
        await caller.until_idle()
    finally:
        await caller.close()


async def test_a_plain_turn_costs_exactly_the_hangover_and_the_engines(configured):
    caller = caller_on(engines(), configured(stt__early_final=False, llm__speculate=False))
    assert caller.clock() == 0.0
    await one_question(caller)
    (turn,) = of(caller, TurnFinished)
    marks = turn.ledger.marks
    stt_final = ENDPOINT + STT_S
    first_piece = stt_final + FIRST_TOKEN_S + 2 * TOKEN_S
    first_audio = tick_after(first_piece + TTS_S)
    expected = {"speech_start": 0.50, "speech_end": SPEECH_END, "endpoint": ENDPOINT, "stt_start": ENDPOINT,
                "stt_final": stt_final, "llm_start": stt_final, "llm_first_token": stt_final + FIRST_TOKEN_S,
                "first_piece": first_piece, "tts_start": first_piece, "tts_first_audio": first_piece + TTS_S,
                "first_audio_out": first_audio}
    assert {k: marks[k] for k in expected} == {k: approx(v) for k, v in expected.items()}
    assert turn.ledger.voice_to_voice_ms == pytest.approx(480.0, abs=0.01)    # 260 + 105 + 45 + 20 + 33 + 17
    assert sum(turn.ledger.stages_ms().values()) == pytest.approx(turn.ledger.voice_to_voice_ms)
    assert turn.ledger.notes["early_final"] is False and turn.ledger.notes["speculative"] is False
    assert turn.transcript == "What is the capital of France?" and turn.reply == "Sure. Paris is lovely."
    # two pieces of 500 ms each: the 50th and last frame went out 0.98 s after the first
    assert marks["last_audio_out"] == approx(first_audio + 0.98)
    states = [(e.state.value) for e in of(caller, StateChanged)]
    assert states == ["caller_speaking", "thinking", "agent_speaking", "listening"]


async def test_speculation_hit_answers_inside_the_hangover(configured):
    caller = caller_on(engines(), configured())
    await one_question(caller)
    (turn,) = of(caller, TurnFinished)
    marks, notes = turn.ledger.marks, turn.ledger.notes
    early = SPEECH_END + 0.02                 # the first silent frame launches the early final
    assert notes["early_final"] is True and notes["speculative"] is True
    assert marks["stt_start"] == approx(early)
    assert marks["llm_start"] == approx(early + STT_S)
    assert marks["tts_first_audio"] == approx(early + STT_S + FIRST_TOKEN_S + 2 * TOKEN_S + TTS_S)
    assert marks["endpoint"] == approx(ENDPOINT)
    # the held audio goes out on the first pull after the hangover expired
    assert marks["first_audio_out"] == approx(ENDPOINT + 0.02)
    assert turn.ledger.voice_to_voice_ms == pytest.approx(280.0, abs=0.01)
    assert turn.ledger.overlaps_ms()["llm_before_endpoint"] == pytest.approx((ENDPOINT - early - STT_S) * 1000)


async def test_speculation_miss_answers_only_the_whole_sentence(configured):
    def text(audio):
        return "What is the capital of Germany?" if voiced_seconds(audio) > 0.9 else "What is the capital of"

    eng = engines(text)
    caller = caller_on(eng, configured())
    try:
        await caller.silence(0.5)
        await caller.say(speech(0.6))
        await caller.wait_until(lambda: caller.conversation.speculating)
        await caller.say(speech(0.4, seed=1))
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = of(caller, TurnFinished)
    assert turn.transcript == "What is the capital of Germany?"
    assert turn.ledger.notes["speculation_wasted"] == 1
    asked = [r[-1]["content"] for r in eng.llm.requests]
    assert asked == ["What is the capital of", "What is the capital of Germany?"]
    # nothing was said before the caller finished, and the early final of the half showed as a partial
    speech_end = turn.ledger.marks["speech_end"]
    assert all(at > speech_end for at, f in caller.agent_audio if f.any())
    assert [e.text for e in of(caller, TranscriptEvent) if not e.final] == ["What is the capital of"]


async def test_barge_in_commits_after_min_speech_and_keeps_what_was_heard(configured):
    tokens = ["One", " two", " three", " four", ".", " Five", " six", " seven", " eight", "."]
    eng = engines(tokens=tokens, tts_ms=1000.0)
    # pieces "One two three four." and "Five six seven eight.": the arithmetic below counts their words
    caller = caller_on(eng, configured(tts__first_piece_max_words=6))
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.wait_until(lambda: caller.playout.audible)
        await caller.silence(1.5)                     # into the second piece
        start = caller.clock()
        await caller.say(speech(0.6, seed=2))
        await caller.until_idle()
    finally:
        await caller.close()
    first, second = of(caller, TurnFinished)
    # voice onset = arrival of the first voiced sample (one tick before the first voiced frame arrived);
    # paused on the 3rd voiced frame (onset_ms 60), silent from the next pull: 80 ms
    onset = start
    assert caller.conversation.barge_ins[0] == (approx(onset), approx(onset + 0.08))
    assert [(e.outcome, e.reaction_ms) for e in of(caller, BargeInEvent)] == [("paused", None), ("interrupted", 80.0)]
    assert first.ledger.notes["interrupted"] is True
    # audio went out from 1.78 (speculation hit) to the pull before the pause, 78 frames = 1.56 s:
    # the first piece, and 0.56 of the second's 4 words = 2 words
    assert first.ledger.marks["first_audio_out"] == approx(1.78) and onset == approx(3.26)
    assert first.reply == "One two three four. Five six"
    assert caller.conversation.history.exchanges[0][1] == first.reply
    assert second.ledger.notes["interrupted"] is False and second.reply == "One two three four. Five six seven eight."


async def test_a_cough_pauses_the_agent_which_then_resumes(configured):
    eng = engines(tts_ms=1000.0)
    caller = caller_on(eng, configured())
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.wait_until(lambda: caller.playout.audible)
        await caller.silence(0.3)
        start = caller.clock()
        await caller.say(speech(0.08, seed=3))        # 4 voiced frames: a voice onset, not a turn
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = of(caller, TurnFinished)
    assert turn.ledger.notes["interrupted"] is False and turn.reply == "Sure. Paris is lovely."
    assert caller.conversation.false_interruptions == 1
    onset, silent = caller.conversation.barge_ins[0]
    assert (onset, silent) == (approx(start), approx(start + 0.08))
    assert [e.outcome for e in of(caller, BargeInEvent)] == ["paused", "resumed"]
    # resumed 600 ms after the last voiced frame (the 4th, at start + 0.08): the played audio rewinds
    # to the segment's start, so the whole 2 s of the reply was played, plus the part heard twice
    played = sum(len(f) for at, f in caller.agent_audio if f.any()) / 16000
    assert played > 2.0


async def test_keypad_entry_is_a_turn(configured):
    caller = caller_on(engines(), configured())
    try:
        await caller.silence(0.3)
        for digit in "42#":
            caller.conversation.push_dtmf(digit)
        await caller.until_idle()
        caller.conversation.push_dtmf("7")            # no '#': the entry ends after 2 s without a key
        pressed = caller.clock()
        await caller.silence(2.1)
        await caller.until_idle()
    finally:
        await caller.close()
    first, second = of(caller, TurnFinished)
    assert first.ledger.notes["keypad"] == "42" and first.transcript == "I pressed 4 2 on my keypad."
    marks = first.ledger.marks
    assert marks["speech_end"] == marks["endpoint"] == marks["stt_final"] == marks["llm_start"] == approx(0.3)
    assert first.ledger.voice_to_voice_ms == pytest.approx((tick_after(0.3 + 0.045 + 0.02 + 0.033) - 0.3) * 1000,
                                                           abs=0.01)
    assert second.ledger.notes["keypad"] == "7"
    assert second.ledger.marks["endpoint"] == approx(pressed + 2.0)


async def test_an_stt_failure_fails_the_turn_and_the_next_one_works(configured):
    caller = caller_on(engines(error=ModelError("stt down")), configured())
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.until_idle()
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.until_idle()
    finally:
        await caller.close()
    assert [(e.turn, e.error) for e in of(caller, TurnFailed)] == [(1, "stt down")]
    (turn,) = of(caller, TurnFinished)
    assert turn.turn == 2 and turn.reply == "Sure. Paris is lovely."
    assert [e.state.value for e in of(caller, StateChanged)][-1] == "listening"


async def test_goodbye_hangs_up_after_the_reply(configured):
    caller = caller_on(engines("Okay, goodbye!"), configured())
    await one_question(caller)
    kinds = [type(e) for e in caller.events if isinstance(e, (TurnFinished, HangupRequested))]
    assert kinds == [TurnFinished, HangupRequested]
    (hangup,) = of(caller, HangupRequested)
    assert hangup.turn == 1 and "goodbye" in hangup.reason


@pytest.mark.looptime(False)
def test_run_virtual_runs_a_call_outside_pytest_marks(config):
    import time

    from sub300.testing.clock import loop_clock, run_virtual

    async def call():
        c = copy.deepcopy(config)
        c.stt.tail_ms = 0   # as in the speculation-hit test
        caller = ScriptedCaller(engines(), c, clock=loop_clock())
        await one_question(caller, seconds=1.0)
        return caller

    wall = time.monotonic()
    caller = run_virtual(call())
    assert time.monotonic() - wall < 2.0
    (turn,) = of(caller, TurnFinished)
    assert turn.ledger.voice_to_voice_ms == pytest.approx(280.0, abs=0.01)   # as in the speculation-hit test


async def test_partials_every_interval_then_the_early_final(configured):
    eng = engines()
    caller = caller_on(eng, configured(stt__partial_interval_ms=1000))
    try:
        await caller.silence(0.5)
        await caller.say(speech(2.5))                 # speech 0.50–3.00, a turn from the 5th frame (0.60)
        await caller.until_idle()
    finally:
        await caller.close()
    # partials 1 s after the turn began and 1 s after the last one; the early final on the first silent frame
    assert [start for start, _ in eng.stt.calls] == [approx(1.60), approx(2.60), approx(3.02)]
    # each transcribes from 200 ms of pre-roll before the speech to the newest sample
    assert [seconds for _, seconds in eng.stt.calls] == [approx(1.30), approx(2.30), approx(2.72)]
    partials = [e.text for e in of(caller, TranscriptEvent) if not e.final]
    assert partials == ["What is the capital of France?"] * 2
    (turn,) = of(caller, TurnFinished)
    assert turn.ledger.marks["stt_start"] == approx(3.02)


async def test_stt_tickets_partials_speculative_early_final_slack_then_committed(configured):
    from sub300.models.scheduling import Urgency

    eng = engines()
    caller = caller_on(eng, configured(stt__partial_interval_ms=1000))
    try:
        await caller.silence(0.5)
        await caller.say(speech(2.5))                 # partials at 1.60 and 2.60, the early final at 3.02
        await caller.wait_until(lambda: len(eng.stt.tickets) == 3)
        during_hangover = [t.urgency for t in eng.stt.tickets if t is not None]
        await caller.until_idle()
    finally:
        await caller.close()
    assert during_hangover == [Urgency.SPECULATIVE, Urgency.SPECULATIVE, Urgency.SLACK]
    # the hangover expired: the early final became the turn's final, on the critical path
    assert [t.urgency for t in eng.stt.tickets if t is not None] == [
        Urgency.SPECULATIVE, Urgency.SPECULATIVE, Urgency.COMMITTED]
    (turn,) = of(caller, TurnFinished)
    assert turn.ledger.queue_ms["stt"] == 0.0 and turn.ledger.work_ms["stt"] == pytest.approx(STT_S * 1000)


def test_fake_vad_follows_its_script():
    from sub300.testing.fakes import FakeVad

    stream = FakeVad(script=[False, True]).new_stream()
    frame = speech(0.02)
    assert [stream.speech_probability(frame) for _ in range(3)] == [0.0, 1.0, 0.0]
    assert FakeVad().new_stream().speech_probability(frame * 0) == 0.0


def test_the_fakes_implement_the_engine_protocols():
    from sub300.models.protocols import LanguageModel, SpeechRecognizer, SpeechSynthesizer, VoiceActivityDetector

    eng = engines()
    assert isinstance(eng.vad, VoiceActivityDetector) and isinstance(eng.stt, SpeechRecognizer)
    assert isinstance(eng.llm, LanguageModel) and isinstance(eng.tts, SpeechSynthesizer)
    # the blocking paths work too (real time: keep the delays tiny)
    assert FakeStt("hi", delay_s=0).transcribe(speech(0.1).astype("float32")).text == "hi"
    (chunk,) = FakeTts(delay_s=0, ms_per_piece=20).synthesize("x")
    assert len(chunk) == 320


async def test_partials_are_skipped_while_the_shared_recogniser_has_a_queue(configured):
    eng = engines()
    eng.stt.waiting = 1             # as ScheduledRecognizer.waiting: other calls' transcriptions are queued
    caller = caller_on(eng, configured(stt__partial_interval_ms=1000))
    await one_question(caller, seconds=2.5)
    partials = [e for e in of(caller, TranscriptEvent) if not e.final]
    assert partials == [] and len(eng.stt.calls) == 1       # only the final
    assert len(of(caller, TurnFinished)) == 1


async def test_a_streaming_engines_first_chunk_goes_out_before_a_mid_sentence_piece_ends(configured):
    """A first piece cut inside a sentence ("The capital of France", 3 words) on an engine that streams
    (FakeTts in 3 chunks, like XTTS): its first chunk goes out at once, but for the tail held to trim
    the piece's trailing silence (agent/reply.py SeamHold); it is not held until the second chunk."""
    tokens = ["The", " capital", " of", " France", " is", " Paris", "."]
    eng = fake_engines(stt=FakeStt("What is the capital of France?", delay_s=STT_S),
                       llm=FakeLlm(tokens, first_token_s=FIRST_TOKEN_S, per_token_s=TOKEN_S),
                       tts=FakeTts(delay_s=0.3, ms_per_piece=1500.0, chunks=3))
    caller = caller_on(eng, configured(stt__early_final=False, llm__speculate=False, tts__first_piece_max_words=3))
    await one_question(caller)
    (turn,) = of(caller, TurnFinished)
    marks = turn.ledger.marks
    assert eng.tts.pieces[0] == "The capital of"
    first_chunk = marks["tts_start"] + 0.3               # 500 ms of tone, of which all but 400 ms go on
    assert marks["tts_first_audio"] == approx(first_chunk)
    assert 0.0 <= marks["first_audio_out"] - first_chunk <= 0.02    # on the next 20 ms pull
    assert eng.tts.pieces == ["The capital of", "France is Paris."]
