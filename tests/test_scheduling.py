"""Deadline classes (models/scheduling.py): the work ticket and the priority pool the STT and TTS services use."""
from __future__ import annotations

import asyncio

import pytest

from sub300.models.scheduling import PriorityLimiter, Urgency, WorkTicket

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
pytestmark = pytest.mark.looptime


async def _hold(limiter: PriorityLimiter, ticket: WorkTicket, order: list[str], seconds: float) -> None:
    async with limiter.slot(ticket):
        order.append(ticket.label)
        await asyncio.sleep(seconds)


async def test_waiters_are_served_by_urgency_then_arrival_and_record_their_queue_wait():
    loop = asyncio.get_running_loop()
    limiter = PriorityLimiter(1, "test")
    order: list[str] = []
    tickets = {name: WorkTicket(urgency, clock=loop.time, label=name) for name, urgency in [
        ("busy", Urgency.COMMITTED), ("spec", Urgency.SPECULATIVE), ("slack", Urgency.SLACK),
        ("late-committed", Urgency.COMMITTED)]}
    tasks = []
    for ticket in tickets.values():
        tasks.append(asyncio.create_task(_hold(limiter, ticket, order, 0.1)))
        await asyncio.sleep(0.01)
    assert limiter.waiting == 3
    await asyncio.gather(*tasks)
    assert order == ["busy", "late-committed", "slack", "spec"]
    assert tickets["late-committed"].queue_wait_s == pytest.approx(0.07)
    assert tickets["spec"].queue_wait_s == pytest.approx(0.29)
    assert tickets["spec"].work_s == pytest.approx(0.1)


async def test_a_promoted_waiter_moves_ahead_and_a_cancelled_one_takes_nothing():
    limiter = PriorityLimiter(1, "test")
    order: list[str] = []
    busy = asyncio.create_task(_hold(limiter, WorkTicket(label="busy"), order, 0.1))
    await asyncio.sleep(0)
    slack = asyncio.create_task(_hold(limiter, WorkTicket(Urgency.SLACK, label="slack"), order, 0.1))
    spec_ticket = WorkTicket(Urgency.SPECULATIVE, label="spec")
    spec = asyncio.create_task(_hold(limiter, spec_ticket, order, 0.1))
    gone = asyncio.create_task(_hold(limiter, WorkTicket(Urgency.COMMITTED, label="gone"), order, 0.1))
    await asyncio.sleep(0.05)
    spec_ticket.urgency = Urgency.COMMITTED     # the turn ended: the speculation is the answer now
    gone.cancel()
    await asyncio.gather(busy, slack, spec, return_exceptions=True)
    assert order == ["busy", "spec", "slack"]
    assert limiter.busy == 0 and limiter.waiting == 0


def test_ticket_listeners_hear_changes_only():
    ticket = WorkTicket(Urgency.SPECULATIVE)
    heard: list[Urgency] = []
    remove = ticket.on_change(lambda t: heard.append(t.urgency))
    ticket.urgency = Urgency.SPECULATIVE
    ticket.urgency = Urgency.COMMITTED
    remove()
    ticket.urgency = Urgency.SLACK
    assert heard == [Urgency.COMMITTED]
    assert ticket.queue_wait_s is None


async def test_slack_waiters_are_served_earliest_deadline_first():
    limiter = PriorityLimiter(1, "test")
    order: list[str] = []
    busy = asyncio.create_task(_hold(limiter, WorkTicket(label="busy"), order, 0.1))
    await asyncio.sleep(0)
    late, soon, none = (WorkTicket(Urgency.SLACK, label=name) for name in ("late", "soon", "no-deadline"))
    late.deadline, soon.deadline = 5.0, 1.0
    tasks = [asyncio.create_task(_hold(limiter, t, order, 0.1)) for t in (none, late, soon)]
    await asyncio.gather(busy, *tasks)
    assert order == ["busy", "soon", "late", "no-deadline"]
