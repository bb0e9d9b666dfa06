"""Virtual time for asyncio: the event loop's clock, fast-forwarded by looptime.

Under pytest, mark a test ``@pytest.mark.looptime`` (the looptime plugin of
the ``test`` extra) and give the code under test ``loop_clock()`` as its
clock: every ``asyncio.sleep`` — the caller's 20 ms ticks, the hangover, a
fake engine's latency — takes no wall time, and the ledger's marks are exact
sums of the configured delays.  Outside pytest (a script, a notebook),
`run_virtual` does the same for one coroutine.

We use looptime (https://github.com/nolar/looptime) rather than a loop of
our own: it is kept, it patches the loop's selector so timers, executors and
i/o all follow the fake time, and it needs nothing in the code under test
beyond taking its clock from the loop.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_clock() -> Callable[[], float]:
    """The running loop's clock (seconds): virtual under looptime, monotonic otherwise."""
    return asyncio.get_running_loop().time


def run_virtual(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``main`` to completion on a new event loop whose time starts at ``start`` and only
    moves when the loop would otherwise wait (requires the ``looptime`` package)."""
    import looptime

    loop = looptime.new_event_loop(start=start)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()
