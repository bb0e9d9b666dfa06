"""SIP: both legs' buffering reaches each turn's ledger (media/sip/call.py), before the observer sees it."""
from __future__ import annotations

import numpy as np
import pytest

from sub300.agent.events import TranscriptEvent, TurnFinished
from sub300.agent.ledger import TurnLedger
from sub300.agent.playout import PlayoutQueue
from sub300.media.sip.call import SipCall


class Agent:
    def __init__(self, clock):
        self.playout = PlayoutQueue(8000, clock)
        self.listeners: list = []
        self.frames: list = []

    def push_frame(self, frame) -> None:
        self.frames.append(frame)

    def push_dtmf(self, digit: str) -> None: ...
    def hold(self) -> None: ...
    def unhold(self, drop_rest: bool) -> None: ...
    async def aclose(self) -> None: ...


def test_the_reorder_buffers_hold_of_the_last_words_is_in_the_ledger_before_the_observer_sees_it():
    now = [100.0]
    agent = Agent(lambda: now[0])
    seen: list = []
    call = SipCall("c", agent, listener=lambda event: seen.append(dict(event.ledger.transport_ms))
                   if isinstance(event, TurnFinished) else None, clock=lambda: now[0])
    for n, held_ms in enumerate((0.0, 0.0, 40.0, 0.0, 20.0)):   # two packets waited for a reordered one
        now[0] = 100.0 + n * 0.02 + held_ms / 1000
        call.on_audio(np.zeros(160, np.int16), arrival=100.0 + n * 0.02)
    now[0] = 100.6
    for listener in agent.listeners:
        listener(TranscriptEvent(1, "hello", final=True))
    ledger = TurnLedger(1)
    ledger.mark("speech_end", 100.1)
    ledger.mark("first_audio_out", 101.0)
    for listener in agent.listeners:
        listener(TurnFinished(1, "hello", "hi", ledger))
    assert ledger.transport_ms["jitter_buffer_in"] == pytest.approx(0.0)   # the median frame was not held
    assert ledger.notes["jitter_buffer_in_max_ms"] == pytest.approx(40.0)
    assert seen == [ledger.transport_ms]
