"""The echo guard (agent/echo.py) hears the line as it really is: agent audio and the silence between pieces.

Fast: synthetic audio (seeded noise bursts stand in for speech: what a
normalised cross-correlation needs is that the echo is the played signal,
delayed), the playout queue pulled on a 20 ms tick as the transports pull it
(a None goes out as silence), and the inbound audio = what went out, 60 ms
late at half the level (a loopback echo; sipp's ``-rtp_echo`` in
tests/test_sip_echo.py is the real one).
"""
from __future__ import annotations

import numpy as np
import pytest

from sub300.agent.echo import EchoGuard
from sub300.agent.playout import PlayoutQueue

RATE = 16_000
FRAME = RATE // 50   # 20 ms
DELAY_FRAMES = 3     # the echo comes back 60 ms late


def _burst(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 3000).astype(np.int16)


@pytest.mark.parametrize("gap_s", [0.0, 0.1, 0.3, 1.5])   # 1.5: the history is all silence, then a new piece
def test_the_echo_of_a_piece_after_a_gap_is_still_echo(gap_s):
    """A reply's second piece comes ``gap_s`` after the first (its synthesis was late): every loud echoed
    frame, the second piece's onset after the silent gap included, must be recognised as echo."""
    t = 0.0
    playout = PlayoutQueue(RATE, clock=lambda: t)
    guard = EchoGuard(RATE)
    playout.on_played = guard.note_played
    schedule = [_burst(0.6, 1)] + [None] * (30 + int(round(gap_s / 0.02))) + [_burst(0.6, 2)] + [None] * 40
    line: list[np.ndarray] = []
    verdicts: list[bool] = []
    for step in schedule:
        if step is not None:   # a piece is ready
            playout.push(step, turn=1, piece=len(verdicts))
            continue
        pulled = playout.pull(FRAME)
        line.append(np.zeros(FRAME, np.int16) if pulled is None else pulled)
        if len(line) > DELAY_FRAMES:
            echoed = line[-1 - DELAY_FRAMES] // 2
            is_echo = guard.is_echo(echoed, t)
            if np.abs(echoed).max() > 1000:
                verdicts.append(is_echo)
        t += 0.02
    assert len(verdicts) >= 55
    assert all(verdicts), f"{verdicts.count(False)} of {len(verdicts)} echoed frames passed for the caller's voice"


def test_the_callers_own_voice_over_the_echo_is_not_echo():
    """The control: a different signal (the caller) on top of the echo, louder than it, is not echo."""
    t = 0.0
    playout = PlayoutQueue(RATE, clock=lambda: t)
    guard = EchoGuard(RATE)
    playout.on_played = guard.note_played
    playout.push(_burst(1.0, 1), turn=1)
    caller = _burst(1.0, 7)
    line: list[np.ndarray] = []
    verdicts = []
    for i in range(50):
        pulled = playout.pull(FRAME)
        line.append(np.zeros(FRAME, np.int16) if pulled is None else pulled)
        if i > DELAY_FRAMES:
            heard = line[-1 - DELAY_FRAMES] // 4 + caller[i * FRAME:(i + 1) * FRAME]
            verdicts.append(guard.is_echo(heard, t))
        t += 0.02
    assert verdicts.count(False) >= len(verdicts) - 8   # all but the first window's worth: the caller gets through
