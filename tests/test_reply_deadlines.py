"""A reply's engine requests carry deadline classes (agent/reply.py, models/scheduling.py).

The LLM request of a speculative reply is SPECULATIVE until the turn ends,
COMMITTED until the first piece is complete, SLACK after; the first piece's
TTS is COMMITTED, later pieces SLACK; the ledger keeps each engine's queue
wait and work.  Fakes on virtual time (see test_conversation_fast.py).
"""
from __future__ import annotations

import asyncio

import pytest

from sub300.agent.events import TurnFinished
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
pytestmark = pytest.mark.looptime

TOKENS = ["Sure", ".", " Paris", " is", " lovely", "."]


class HistoryLlm(FakeLlm):
    """A `FakeLlm` that keeps each request's urgency history: the class when asked, then every change."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.histories: list[list[Urgency]] = []

    def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket: WorkTicket | None = None):
        assert ticket is not None, "a reply always passes its ticket"
        history = [ticket.urgency]
        ticket.on_change(lambda t: history.append(t.urgency))
        self.histories.append(history)
        return super().stream_chat(messages, max_tokens=max_tokens, temperature=temperature, ticket=ticket)


async def one_turn(config, llm: HistoryLlm, tts: FakeTts) -> TurnFinished:
    engines = fake_engines(stt=FakeStt("What is the capital of France?", delay_s=0.105), llm=llm, tts=tts)
    caller = ScriptedCaller(engines, config, clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    return turn


async def test_a_committed_reply_is_committed_until_its_first_piece_then_slack(config):
    # 2 s of audio per piece: the rest of the answer always has slack
    llm, tts = HistoryLlm(TOKENS, first_token_s=0.045, per_token_s=0.01), FakeTts(delay_s=0.033, ms_per_piece=2000)
    turn = await one_turn(configure(config, llm__speculate=False, stt__partial_interval_ms=0), llm, tts)
    assert llm.histories == [[Urgency.COMMITTED, Urgency.SLACK]]
    assert [t.urgency for t in tts.tickets] == [Urgency.COMMITTED, Urgency.SLACK]
    # fakes have no queue; the work is the engine's own delay
    assert turn.ledger.queue_ms == {"stt": 0.0, "llm": 0.0, "tts": 0.0}
    assert turn.ledger.work_ms == {"stt": pytest.approx(105.0, abs=0.01), "llm": pytest.approx(45.0, abs=0.01),
                                   "tts": pytest.approx(33.0, abs=0.01)}


async def test_a_speculative_reply_is_speculative_until_the_turn_ends(config):
    # a slow LLM: the speculation has not made its first piece when the hangover expires
    llm, tts = HistoryLlm(TOKENS, first_token_s=0.4, per_token_s=0.01), FakeTts(delay_s=0.033)
    turn = await one_turn(configure(config, llm__speculate=True, stt__partial_interval_ms=0), llm, tts)
    assert turn.ledger.notes.get("speculative") is True
    assert llm.histories[-1] == [Urgency.SPECULATIVE, Urgency.COMMITTED, Urgency.SLACK]
    assert tts.tickets[0] is not None and tts.tickets[0].urgency == Urgency.COMMITTED
    assert "llm" in turn.ledger.queue_ms and "llm" in turn.ledger.work_ms


async def test_slack_work_carries_its_deadline_and_a_gap_is_counted(config):
    # the first piece plays 0.5 s; the LLM needs 0.3 s a token for the next sentence: the caller
    # hears a gap; the rest of the answer stays SLACK, with the deadline of the audio that ran out
    llm, tts = HistoryLlm(TOKENS, first_token_s=0.045, per_token_s=0.3), FakeTts(delay_s=0.033, ms_per_piece=500)
    turn = await one_turn(configure(config, llm__speculate=False, stt__partial_interval_ms=0), llm, tts)
    (history,) = llm.histories
    assert history == [Urgency.COMMITTED, Urgency.SLACK], history
    assert turn.ledger.notes["gaps"] >= 1
    ticket = llm.tickets[0]
    assert ticket is not None and ticket.deadline is not None      # when the queued audio ran out
    assert turn.reply == "Sure. Paris is lovely."


async def test_late_work_stays_slack_through_a_long_gap(config):
    # 0.7 s a token: the second sentence comes long after the first piece's 0.5 s of audio ran out;
    # it stays SLACK (promoting it made other calls' first tokens wait), and the gap is counted
    llm, tts = HistoryLlm(TOKENS, first_token_s=0.045, per_token_s=0.7), FakeTts(delay_s=0.033, ms_per_piece=500)
    turn = await one_turn(configure(config, llm__speculate=False, stt__partial_interval_ms=0), llm, tts)
    assert llm.histories == [[Urgency.COMMITTED, Urgency.SLACK]]
    assert turn.ledger.notes["gaps"] == 1
