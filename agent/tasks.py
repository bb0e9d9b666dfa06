"""Task ownership: every asyncio task has an owner that awaits or cancels it.

`TaskOwner` is the one helper the conversation, the SIP dialogs and the
transports use instead of bare ``ensure_future`` plus done-callbacks.  An
owner can be nested (`child()`): a per-utterance scope is cancelled as one
when the caller goes on speaking, and the call's owner still sees every task
if the whole call ends first.

Ideas from pipecat's TaskManager (one registry of tasks, a cancel timeout for
libraries that swallow cancellation) and from `asyncio.TaskGroup` (a scope
that ends its children), without TaskGroup's rule that one failing child
cancels its siblings: in a call, one failed transcription must not end the
turn's other work, so failures are logged (or handed to ``on_error``) instead.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

#: seconds `aclose` waits for cancelled tasks before it gives up on them (and says so)
CANCEL_TIMEOUT_S = 2.0


class TaskOwner:
    """A set of tasks that end together.

    ``spawn(coro, name)`` starts a task the owner keeps until it finishes;
    ``cancel()`` cancels all of them (children first) without waiting;
    ``aclose()`` cancels and awaits them (bounded by ``CANCEL_TIMEOUT_S``).
    A task that fails with an exception is logged once, unless its type is in
    ``expected`` (for instance model errors, which the caller reports itself).
    """

    def __init__(self, name: str, *, expected: tuple[type[BaseException], ...] = (),
                 parent: TaskOwner | None = None):
        self.name = name
        self._expected = expected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: set[TaskOwner] = set()
        self._parent = parent
        self.closed = False

    # ------------------------------------------------------------ starting work
    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned here (call from the event loop)."""
        if self.closed:
            coro.close()
            raise RuntimeError(f"task owner {self.name!r} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        return self.adopt(task)

    def adopt(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Take ownership of a task started elsewhere (idempotent)."""
        if task not in self._tasks:
            self._tasks.add(task)
            task.add_done_callback(self._finished)
        return task

    def child(self, name: str) -> TaskOwner:
        """A nested owner: cancelled with this one, or on its own."""
        child = TaskOwner(f"{self.name}/{name}", expected=self._expected, parent=self)
        self._children.add(child)
        return child

    # ------------------------------------------------------------ ending work
    def cancel(self) -> None:
        """Cancel every task of this owner and its children; do not wait."""
        self.closed = True
        for child in list(self._children):
            child.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._parent is not None:
            self._parent._children.discard(self)

    async def aclose(self, timeout: float = CANCEL_TIMEOUT_S) -> None:
        """Cancel every task (children included) and wait for them to end."""
        tasks = self.all_tasks()
        self.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("%s: task %s ignored cancellation for %.1f s; left behind",
                        self.name, task.get_name(), timeout)

    def all_tasks(self) -> set[asyncio.Task[Any]]:
        """The tasks of this owner and its children that have not finished."""
        tasks = {t for t in self._tasks if not t.done()}
        for child in self._children:
            tasks |= child.all_tasks()
        return tasks

    def __len__(self) -> int:
        return len(self.all_tasks())

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, self._expected):
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=error)

