"""One bridge from a blocking producer in a worker thread to an asyncio consumer.

The engines' inference is blocking (CTranslate2 generation, Piper, an
espeak-ng subprocess); the conversation is asyncio.  ``stream_from_thread``
runs a producer in its own thread and hands what it emits to an async
iterator:

* the producer gets ``emit(item) -> bool`` and a ``threading.Event`` stop
  flag; ``emit`` returns False once the consumer has gone, and the producer
  should then return (a CTranslate2 callback returns True to stop at the
  next token; an iterator is left at its next item);
* ``ahead=N`` is flow control: the producer runs at most N items ahead of the
  consumer (``emit`` blocks while N items are delivered but not yet taken).
  A consumer that stops reading thereby pauses the producer and frees the
  CPU for what it does instead;
* an exception in the producer is raised in the consumer;
* closing or cancelling the consumer sets the stop flag.  With
  ``wait_on_close`` it then awaits the producer's end without blocking the
  loop (CTranslate2's prefill cannot be interrupted, and the next generation
  on the same model should not overlap it); without, it returns at once
  (barge-in must not wait for the sentence being synthesized) and the
  producer stops at its next item.

``iterate_in_thread`` is the same over a blocking iterator, which is closed
in the worker thread (so a subprocess behind it is reaped there).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")
Emit = Callable[[T], bool]
log = logging.getLogger(__name__)

#: how often a producer blocked on flow control looks at the stop flag (seconds)
_CREDIT_POLL_S = 0.05


class StreamEnd:
    """The last item a worker hands its consumer: the end of the stream, or the error that ended it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def stream_from_thread(
    produce: Callable[[Emit[T], threading.Event], None],
    *,
    ahead: int | None = None,
    wait_on_close: bool = False,
    name: str = "producer",
) -> AsyncGenerator[T, None]:
    """Yield what ``produce(emit, stop)`` emits from a worker thread (see the module docstring)."""
    if ahead is not None and ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead!r}")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    finished: asyncio.Future[None] = loop.create_future()
    stop = threading.Event()
    credit = threading.Semaphore(ahead) if ahead is not None else None

    def post(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def emit(item: T) -> bool:
        if credit is not None:
            while not credit.acquire(timeout=_CREDIT_POLL_S):
                if stop.is_set():
                    return False
        if stop.is_set():
            return False
        post(item)
        return not stop.is_set()

    def mark_finished() -> None:
        if not finished.done():
            finished.set_result(None)

    def work() -> None:
        end = StreamEnd()
        try:
            produce(emit, stop)
        except BaseException as error:  # handed to the consumer, raised there
            end = StreamEnd(error)
        finally:
            post(end)
            try:
                loop.call_soon_threadsafe(mark_finished)
            except RuntimeError:
                pass

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if isinstance(item, StreamEnd):
                if item.error is not None:
                    raise item.error
                return
            if credit is not None:
                credit.release()
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if wait_on_close and not finished.done():
            await asyncio.shield(finished)
            thread.join(timeout=1.0)


async def iterate_in_thread(
    make_iterator: Callable[[], Iterator[T]],
    *,
    ahead: int | None = None,
    wait_on_close: bool = False,
    name: str = "iterator",
) -> AsyncGenerator[T, None]:
    """Yield the items of a blocking iterator that runs in a worker thread.

    The worker stops at its next item once the consumer has gone, and closes
    the iterator in its own thread.
    """

    def produce(emit: Emit[T], stop: threading.Event) -> None:
        iterator = make_iterator()
        try:
            for item in iterator:
                if not emit(item):
                    break
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing a worker iterator failed")

    async with aclosing(stream_from_thread(produce, ahead=ahead, wait_on_close=wait_on_close, name=name)) as items:
        async for item in items:
            yield item
