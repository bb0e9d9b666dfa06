"""Bridge blocking generators (TTS engines) into asyncio without blocking the loop."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_END = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield the items of a blocking iterator that runs in a worker thread.

    Closing or cancelling the consumer sets a stop flag: the worker stops at
    its next item and closes the iterator in its own thread (so a subprocess
    behind it is reaped there).  The consumer does not wait for the item in
    progress, so cancellation (barge-in, hang-up) is immediate.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def deliver(item: object, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            pass

    def work() -> None:
        iterator = None
        try:
            iterator = make_iterator()
            for item in iterator:
                if stop.is_set():
                    break
                deliver(item)
        except BaseException as error:  # handed to the consumer, raised there
            deliver(_END, error)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing a worker iterator failed")
        deliver(_END)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if not worker.done():
            worker.add_done_callback(lambda f: f.exception())  # mark any error as retrieved
