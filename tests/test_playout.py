from __future__ import annotations

import asyncio

import numpy as np

from sub300.agent.playout import PlayoutQueue


class StepClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_pull_pads_and_reports_first_sample_out():
    clock = StepClock()
    queue = PlayoutQueue(16000, clock)
    assert queue.pull(320) is None and queue.idle
    seen = []
    queue.push(np.ones(500, np.int16), turn=1, on_first_out=seen.append)
    clock.now = 1.5
    first = queue.pull(320)
    assert seen == [1.5] and (first == 1).all()
    second = queue.pull(320)
    assert (second[:180] == 1).all() and (second[180:] == 0).all()
    assert queue.played_samples(1) == 500
    assert queue.pull(320) is None


async def test_flush_drops_everything_at_once_and_wakes_waiters():
    queue = PlayoutQueue(16000, StepClock())
    queue.push(np.ones(16000, np.int16), turn=1)
    queue.pull(320)
    waiter = asyncio.ensure_future(queue.wait_idle())
    await asyncio.sleep(0)
    assert not waiter.done()
    assert queue.flush() == 16000 - 320
    await asyncio.wait_for(waiter, 1)
    assert queue.played_samples(1) == 320 and queue.queued_samples == 0
