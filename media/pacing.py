"""The one paced 20 ms clock of every transport: absolute deadlines, one rule for late ticks.

Real-time audio is moved in fixed slots (20 ms frames).  Sleeping 20 ms in a
loop drifts by the time each iteration takes; `Pacer` instead computes tick
*n*'s deadline as ``start + n * period`` on the given clock, so the pace
never drifts, whatever each tick costs.

Two ways to use it:

* push loops (the file transport, the SIP call's media loop) hand a per-tick
  function to `Pacer.run`, which calls it once per deadline until it returns
  a result;
* pull models (aiortc's sender calling `recv()`, a scripted test caller
  driven by its script) call `Pacer.next_tick` once per frame they produce.

Late ticks, in one place: a tick whose deadline has passed runs at once (no
sleep) and keeps its own deadline, so a loop that fell behind catches up and
frames keep their places on the timeline.  Every tick yields to the event
loop at least once, so a loop catching up still lets the pipeline's tasks
(STT, LLM, TTS) run between frames.  With ``max_lag_s`` set, a loop that
fell further behind than that (a blocked event loop) restarts its clock
instead of bursting all the missed frames out (WebRTC does this: a burst
would only fill the browser's jitter buffer).
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

Clock = Callable[[], float]
T = TypeVar("T")
#: a per-tick function: gets the tick's deadline (clock seconds); returns None to go on, anything else to stop
TickFunction = Callable[[float], T | None | Awaitable[T | None]]


class Pacer:
    """Ticks every ``period_s`` seconds of ``clock``, on absolute deadlines.

    The clock starts at the first tick's call (or at ``start``, a time on
    ``clock``): tick *n* (from 1) is due at ``start + n * period_s``.
    ``count`` is the number of ticks taken so far.
    """

    def __init__(self, period_s: float, clock: Clock, *, start: float | None = None,
                 max_lag_s: float | None = None) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, not {period_s}")
        self.period = period_s
        self.clock = clock
        self.start = start
        self.max_lag = max_lag_s
        self.count = 0
        #: how many times the clock was restarted after falling more than max_lag_s behind
        self.restarts = 0

    @property
    def next_deadline(self) -> float:
        """When the next tick is due (clock seconds); before the first tick, one period from now."""
        start = self.clock() if self.start is None else self.start
        return start + (self.count + 1) * self.period

    async def next_tick(self) -> float:
        """Wait for the next tick and return its deadline (clock seconds).

        Returns at once (after yielding to the event loop) when the deadline
        has passed; see the module's docstring for the late-tick rules.
        """
        now = self.clock()
        if self.start is None:
            self.start = now
        elif self.max_lag is not None and now - self.next_deadline > self.max_lag:
            self.start, self.count = now, 0
            self.restarts += 1
        deadline = self.next_deadline
        delay = deadline - now
        await asyncio.sleep(delay if delay > 0 else 0)
        self.count += 1
        return deadline

    async def run(self, on_tick: TickFunction[T]) -> T:
        """Call ``on_tick(deadline)`` at every tick until it returns something other than None; return that.

        ``on_tick`` may be a plain function or a coroutine function.  An
        exception from it ends the loop and propagates; cancelling the
        awaiting task stops the loop between ticks.
        """
        while True:
            result = on_tick(await self.next_tick())
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return cast(T, result)
