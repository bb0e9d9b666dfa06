"""Deadline classes and the work ticket that every engine request carries.

Every engine is shared by all calls.  A request says how urgent it is, and
its urgency may change while it waits or runs:

* ``COMMITTED``: on a caller's critical path now — the final transcript of a
  turn that has ended, the LLM's first tokens, the first TTS piece;
* ``SLACK``: needed later — the rest of a reply whose earlier audio is still
  playing (it must only be ready before that audio runs out), a partial
  transcript shown on the page;
* ``SPECULATIVE``: may be thrown away — a reply started on the early
  transcript while the endpointing hangover runs.  It becomes COMMITTED when
  the turn ends (`WorkTicket.urgency` is settable).

Schedulers serve the lowest value first (then arrival order), so speculative
work of one call never takes a slot that committed work of another is
waiting for.  The ticket also records, on one clock, when the request was
submitted, when its work started and ended: the ledger shows the queue
wait (submitted → started) apart from the work, so a slow turn says whether
it waited or computed.

`PriorityLimiter` is the bounded, priority-ordered pool that the STT and TTS
services use; the embedded LLM has its own batching scheduler
(models/llm_batching.py).  The vocabulary follows the deadline-aware
serving literature (e.g. vLLM's priority scheduling, Orca's iteration-level
scheduling), the classes are sub300's own.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from enum import IntEnum

Clock = Callable[[], float]


class Urgency(IntEnum):
    """A request's deadline class: the lower, the sooner it is served."""

    COMMITTED = 0
    SLACK = 1
    SPECULATIVE = 2


class WorkTicket:
    """One engine request's scheduling handle (thread-safe: the LLM's scheduler thread reads it).

    ``urgency`` may be changed by its owner at any time; listeners registered
    with `on_change` (a scheduler) hear of it.  Times are seconds on ``clock``
    (``time.monotonic`` unless the caller has another: the conversation's).
    ``queue_wait_s`` and ``work_s`` are None until known.
    """

    __slots__ = ("_urgency", "clock", "submitted", "started", "finished", "_listeners", "_lock", "label", "deadline",
                 "network_s", "remote_queue_s")

    def __init__(self, urgency: Urgency = Urgency.COMMITTED, *, clock: Clock = time.monotonic, label: str = ""):
        self._urgency = Urgency(urgency)
        self.clock = clock
        self.label = label
        #: SLACK work: when it is needed (clock seconds; the moment the audio before it runs out);
        #: None = no known deadline.  Among SLACK requests the earliest deadline is served first (EDF).
        self.deadline: float | None = None
        self.submitted: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        #: a remote engine (models/remote.py): of the time from ``started`` (request sent) to its first byte,
        #: what the endpoint said it spent waiting in its own queue (its ``Server-Timing: queue;dur=``) and
        #: the rest that was neither its queue nor its work: the network (s; None = local engine or unknown)
        self.remote_queue_s: float | None = None
        self.network_s: float | None = None
        self._listeners: list[Callable[[WorkTicket], None]] = []
        self._lock = threading.Lock()

    @property
    def urgency(self) -> Urgency:
        return self._urgency

    @urgency.setter
    def urgency(self, value: Urgency) -> None:
        value = Urgency(value)
        with self._lock:
            if value == self._urgency:
                return
            self._urgency = value
            listeners = list(self._listeners)
        for listener in listeners:
            listener(self)

    def rank(self) -> tuple[int, float]:
        """The order schedulers serve in (lowest first): the class, then, for SLACK, the deadline."""
        deadline = self.deadline if self._urgency == Urgency.SLACK and self.deadline is not None else float("inf")
        return (int(self._urgency), deadline)

    def on_change(self, listener: Callable[[WorkTicket], None]) -> Callable[[], None]:
        """Call ``listener(ticket)`` when the urgency changes; returns the function that unregisters it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return remove

    # ------------------------------------------------------------ timing
    def mark_submitted(self) -> None:
        if self.submitted is None:
            self.submitted = self.clock()

    def mark_started(self) -> None:
        """The engine began this request's work (the first time counts: a preempted request keeps it)."""
        self.mark_submitted()
        if self.started is None:
            self.started = self.clock()

    def mark_finished(self) -> None:
        if self.finished is None:
            self.finished = self.clock()

    @property
    def queue_wait_s(self) -> float | None:
        if self.submitted is None or self.started is None:
            return None
        return max(0.0, self.started - self.submitted)

    @property
    def work_s(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return max(0.0, self.finished - self.started)

    def __repr__(self) -> str:
        return f"WorkTicket({self.label or '?'}, {self._urgency.name})"


class PriorityLimiter:
    """At most ``slots`` requests at work at once; waiters are served by (urgency, arrival).

    ``async with limiter.slot(ticket):`` waits for a slot, marks the ticket
    started, and releases the slot (marking it finished) on exit.  The order
    is decided when a slot frees, on each waiter's *current* urgency, so a
    speculative request promoted to COMMITTED moves ahead.  A waiter that is
    cancelled leaves the queue and takes nothing.  ``waiting`` and
    ``busy`` are for metrics and admission.  Among SLACK waiters the earliest
    ``deadline`` goes first.
    """

    def __init__(self, slots: int, name: str = "engine") -> None:
        if slots < 1:
            raise ValueError(f"{name}: slots must be at least 1, got {slots!r}")
        self.slots = slots
        self.name = name
        self.busy = 0
        self._waiters: dict[asyncio.Future[None], tuple[WorkTicket, int]] = {}
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, ticket: WorkTicket) -> AsyncIterator[None]:
        ticket.mark_submitted()
        await self._acquire(ticket)
        ticket.mark_started()
        try:
            async with critical_path.working(ticket):
                yield
        finally:
            ticket.mark_finished()
            self._release()

    async def _acquire(self, ticket: WorkTicket) -> None:
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[future] = (ticket, next(self._order))
        try:
            await future
        except asyncio.CancelledError:
            if self._waiters.pop(future, None) is None and future.done() and not future.cancelled():
                self._release()          # the slot was granted as we were cancelled: hand it on
            raise

    def _release(self) -> None:
        self.busy -= 1
        while self._waiters and self.busy < self.slots:
            future = min(self._waiters, key=lambda f: (self._waiters[f][0].rank(), self._waiters[f][1]))
            del self._waiters[future]
            if not future.done():
                self.busy += 1
                future.set_result(None)


class CriticalPath:
    """How many COMMITTED requests are at work right now, across the process's engines (thread-safe).

    On a CPU every engine shares the same cores, so slack work of one engine
    (the LLM finishing a reply whose audio still plays) slows committed work
    of another (the final transcript of a turn that just ended).  The STT and
    TTS services count their committed work here (`working`); the LLM's
    scheduler pauses a round with no committed member while ``busy``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def busy(self) -> bool:
        return self._count > 0

    @contextmanager
    def counting(self, ticket: WorkTicket) -> Iterator[None]:
        """Count ``ticket``'s work while it runs, if it is COMMITTED when it starts."""
        counted = ticket.urgency == Urgency.COMMITTED
        if counted:
            with self._lock:
                self._count += 1
        try:
            yield
        finally:
            if counted:
                with self._lock:
                    self._count -= 1

    @asynccontextmanager
    async def working(self, ticket: WorkTicket) -> AsyncIterator[None]:
        """`counting` for a coroutine's work."""
        with self.counting(ticket):
            yield


#: the process's one critical-path gauge (engines are process-wide too)
critical_path = CriticalPath()
