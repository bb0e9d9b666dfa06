"""The one paced loop (media/pacing.py): absolute deadlines, late ticks, restarts after a stall."""
from __future__ import annotations

import asyncio

import pytest

from sub300.media.pacing import Pacer


class StepClock:
    """A clock the test moves by hand; ``asyncio.sleep`` still yields, so the loop keeps running."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_deadlines_are_absolute_and_late_ticks_keep_theirs():
    clock = StepClock()
    pacer = Pacer(0.02, clock, start=clock())
    deadlines = []
    for work in (0.0, 0.005, 0.07, 0.0, 0.0, 0.0):   # one slow tick: 70 ms of work
        clock.now = max(clock.now, pacer.next_deadline)   # time reaches the deadline (or is already past it)
        deadlines.append(await pacer.next_tick())
        clock.now += work
    assert deadlines == pytest.approx([100.02, 100.04, 100.06, 100.08, 100.10, 100.12])
    assert pacer.count == 6 and pacer.restarts == 0


async def test_a_stall_longer_than_max_lag_restarts_the_clock():
    clock = StepClock()
    pacer = Pacer(0.02, clock, start=clock(), max_lag_s=0.5)
    clock.now = pacer.next_deadline
    assert await pacer.next_tick() == pytest.approx(100.02)
    clock.now += 0.6                                    # the event loop was blocked
    assert await pacer.next_tick() == pytest.approx(100.62 + 0.02)
    assert pacer.restarts == 1


async def test_run_calls_until_a_result_and_accepts_coroutines():
    seen = []

    def tick(deadline: float) -> str | None:
        seen.append(deadline)
        return "done" if len(seen) == 3 else None

    assert await Pacer(0.001, asyncio.get_running_loop().time).run(tick) == "done"
    assert len(seen) == 3 and seen == sorted(seen)

    async def atick(deadline: float) -> int:
        return 7

    assert await Pacer(0.001, asyncio.get_running_loop().time).run(atick) == 7


async def test_every_tick_yields_even_when_late():
    clock = StepClock()
    pacer = Pacer(0.02, clock, start=0.0)   # every deadline long past
    ran = []

    async def other() -> None:
        ran.append(True)

    task = asyncio.get_running_loop().create_task(other())
    await pacer.next_tick()
    assert ran == [True]
    await task
