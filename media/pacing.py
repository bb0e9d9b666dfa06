"""A drift-free periodic clock for real-time audio (absolute deadlines, not sleep(20 ms) in a loop)."""
from __future__ import annotations

import asyncio
from typing import Callable

Clock = Callable[[], float]


class Ticker:
    def __init__(self, period_s: float, clock: Clock, start: float | None = None):
        self.period = period_s
        self.clock = clock
        self.start = clock() if start is None else start
        self.count = 0

    @property
    def next_deadline(self) -> float:
        return self.start + (self.count + 1) * self.period

    async def wait(self) -> float:
        """Sleep until the next tick; returns its deadline. Late ticks are not skipped."""
        deadline = self.next_deadline
        delay = deadline - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        self.count += 1
        return deadline
