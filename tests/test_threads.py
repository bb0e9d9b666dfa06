"""The thread → asyncio bridge (models/threads.py) that the LLM and TTS share."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sub300.models.threads import iterate_in_thread, stream_from_thread


async def _until(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return predicate()


class _Numbers:
    """A blocking iterator that records what happened to it, and in which thread."""

    def __init__(self, n: int = 1000, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.produced = 0
        self.closed_in: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.produced == self.fail_at:
            raise ValueError(f"boom at {self.produced}")
        if self.produced >= self.n:
            raise StopIteration
        self.produced += 1
        time.sleep(0.001)
        return self.produced - 1

    def close(self) -> None:
        self.closed_in = threading.current_thread().name


async def test_items_in_order_and_iterator_closed_in_the_worker():
    numbers = _Numbers(20)
    assert [i async for i in iterate_in_thread(lambda: numbers, name="numbers")] == list(range(20))
    assert await _until(lambda: numbers.closed_in is not None)
    assert numbers.closed_in == "numbers"


async def test_errors_propagate_after_the_items_before_them():
    got = []
    with pytest.raises(ValueError, match="boom at 3"):
        async for i in iterate_in_thread(lambda: _Numbers(fail_at=3)):
            got.append(i)
    assert got == [0, 1, 2]

    def produce(emit, stop):
        raise KeyError("from the producer")

    with pytest.raises(KeyError):
        async for _ in stream_from_thread(produce):
            pass


async def test_closing_stops_the_worker_at_its_next_item():
    numbers = _Numbers()
    items = iterate_in_thread(lambda: numbers)
    async for i in items:
        if i == 2:
            break
    await items.aclose()
    assert await _until(lambda: numbers.closed_in is not None)
    produced = numbers.produced
    await asyncio.sleep(0.05)
    assert numbers.produced == produced < 1000


async def test_cancelling_the_consumer_stops_the_producer():
    stopped = threading.Event()
    first = asyncio.Event()

    def produce(emit, stop):
        while emit("tick"):
            time.sleep(0.002)
        assert stop.is_set()
        stopped.set()

    async def consume():
        async for _ in stream_from_thread(produce):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(stopped.wait, 2)


@pytest.mark.parametrize("ahead", [1, 3])
async def test_flow_control_bounds_how_far_the_worker_runs_ahead(ahead):
    numbers = _Numbers(100)
    items = iterate_in_thread(lambda: numbers, ahead=ahead)
    taken = 0
    async for _ in items:
        taken += 1
        if taken == 2:
            await asyncio.sleep(0.2)  # the consumer is busy: the producer must wait
            # produced = taken + delivered-but-not-taken (≤ ahead) + the one blocked in emit
            assert numbers.produced <= taken + ahead + 1
    assert taken == 100
    # without flow control the same producer runs to its end meanwhile
    free = _Numbers(100)
    async for _ in iterate_in_thread(lambda: free):
        await asyncio.sleep(0.2)
        assert free.produced == 100
        break


async def test_wait_on_close_awaits_the_worker_without_blocking_the_loop():
    def produce(emit, stop):
        emit("first")
        time.sleep(0.3)  # uninterruptible work (a prefill); ignores the stop flag

    for wait_on_close in (True, False):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        items = stream_from_thread(produce, wait_on_close=wait_on_close)
        assert await items.__anext__() == "first"
        t0 = time.monotonic()
        await items.aclose()
        closing = time.monotonic() - t0
        tick_task.cancel()
        if wait_on_close:
            assert closing >= 0.2 and ticks >= 5  # waited, and the loop kept running
        else:
            assert closing < 0.1


async def test_ahead_must_be_positive():
    with pytest.raises(ValueError):
        async for _ in stream_from_thread(lambda emit, stop: None, ahead=0):
            pass
