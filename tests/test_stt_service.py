"""The shared STT service (models/stt_service.py): deadline order, promotion, cancellation, batching, errors.

`GatedRecognizer` is a fake engine whose runs block in the service's worker
thread until the test lets them through, one by one (``gate``), so what
waits while the worker is busy is exact.  Tickets run on a hand-moved clock.
Each test takes milliseconds.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from sub300.models.protocols import ModelError, SpeechRecognizer, Transcript
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.stt_service import ScheduledRecognizer, auto_max_batch, auto_workers


class GatedRecognizer:
    """A batching fake: a clip is ``np.full(n, k)`` and its transcript is ``str(k)``.

    Every run (single or batched) records its clips' labels in ``runs`` and then
    waits for one ``gate.release()``.  A batch holding a label in ``fail_on``
    raises ``ModelError``.
    """

    name, device = "gated-stt", "cpu/fake"

    def __init__(self, fail_on: frozenset[str] = frozenset()) -> None:
        self.runs: list[list[str]] = []
        self.gate = threading.Semaphore(0)
        self.fail_on = fail_on

    def transcribe(self, audio: np.ndarray) -> Transcript:
        return self.transcribe_batch([audio])[0]

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[Transcript]:
        labels = [str(int(a[0])) for a in audios]
        self.runs.append(labels)
        if not self.gate.acquire(timeout=5.0):
            raise AssertionError("the test never released this run")
        if self.fail_on & set(labels):
            raise ModelError(f"batch {labels} failed")
        return [Transcript(label, len(a) / 16_000, 0.0) for label, a in zip(labels, audios, strict=True)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def until(condition, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


@pytest.fixture
async def make():
    services: list[tuple[ScheduledRecognizer, GatedRecognizer]] = []

    def build(*, max_batch: int = 1, fail_on: frozenset[str] = frozenset()):
        fake = GatedRecognizer(fail_on)
        service = ScheduledRecognizer(fake, workers=1, max_batch=max_batch)
        services.append((service, fake))
        return service, fake

    yield build
    for service, fake in services:
        fake.gate.release(100)           # never leave a worker thread blocked
        await service.aclose()


def submit(service: ScheduledRecognizer, label: int, urgency: Urgency, clock: Clock | None = None):
    ticket = WorkTicket(urgency, clock=clock or Clock(), label=str(label))
    task = asyncio.ensure_future(service.transcribe_async(np.full(1600, label, np.float32), ticket=ticket))
    return task, ticket


async def test_committed_work_is_served_before_slack_work_that_came_first(make):
    service, fake = make()
    assert isinstance(service, SpeechRecognizer)
    running, _ = submit(service, 1, Urgency.SLACK)
    await until(lambda: fake.runs == [["1"]])
    tasks = [submit(service, label, urgency)[0] for label, urgency in
             [(2, Urgency.SLACK), (3, Urgency.SLACK), (4, Urgency.COMMITTED)]]
    await asyncio.sleep(0)
    assert service.waiting == 3 and service.busy == 1
    fake.gate.release(4)
    texts = [t.text for t in await asyncio.gather(running, *tasks)]
    assert texts == ["1", "2", "3", "4"]
    assert fake.runs == [["1"], ["4"], ["2"], ["3"]]
    assert service.waiting == 0


async def test_a_promoted_waiter_moves_ahead(make):
    service, fake = make()
    running, _ = submit(service, 1, Urgency.COMMITTED)
    await until(lambda: len(fake.runs) == 1)
    slack, _ = submit(service, 2, Urgency.SLACK)
    early, early_ticket = submit(service, 3, Urgency.SPECULATIVE)
    await asyncio.sleep(0)
    early_ticket.urgency = Urgency.COMMITTED      # the turn ended: the early final is the final
    fake.gate.release(3)
    await asyncio.gather(running, slack, early)
    assert fake.runs == [["1"], ["3"], ["2"]]


async def test_a_cancelled_waiter_leaves_no_trace_and_the_next_is_served(make):
    service, fake = make()
    running, _ = submit(service, 1, Urgency.COMMITTED)
    await until(lambda: len(fake.runs) == 1)
    gone, gone_ticket = submit(service, 2, Urgency.COMMITTED)
    nxt, _ = submit(service, 3, Urgency.SLACK)
    await asyncio.sleep(0)
    assert service.waiting == 2
    gone.cancel()
    await asyncio.sleep(0)
    assert service.waiting == 1
    fake.gate.release(2)
    assert (await nxt).text == "3" and (await running).text == "1"
    assert gone.cancelled() and gone_ticket.started is None
    assert fake.runs == [["1"], ["3"]]


async def test_waiting_requests_are_batched_most_urgent_first_up_to_max_batch(make):
    service, fake = make(max_batch=2)
    running, _ = submit(service, 1, Urgency.COMMITTED)
    await until(lambda: len(fake.runs) == 1)
    waiting = [submit(service, label, urgency) for label, urgency in
               [(2, Urgency.COMMITTED), (3, Urgency.SLACK), (4, Urgency.COMMITTED), (5, Urgency.COMMITTED),
                (6, Urgency.SLACK)]]
    await asyncio.sleep(0)
    fake.gate.release()
    await until(lambda: len(fake.runs) == 2)
    assert fake.runs[1] == ["2", "4"]            # up to max_batch, the most urgent first
    waiting[0][0].cancel()            # in the running batch: its result is dropped, the batch goes on
    fake.gate.release()
    assert (await waiting[2][0]).text == "4" and (await running).text == "1"
    assert waiting[0][0].cancelled()
    await until(lambda: len(fake.runs) == 3)
    assert fake.runs[2] == ["5"]                 # a batch holds one deadline class: 5 does not carry 3 along
    waiting[4][0].cancel()            # not in a batch yet: leaves the queue
    fake.gate.release(2)
    assert (await waiting[1][0]).text == "3" and (await waiting[3][0]).text == "5"
    await asyncio.sleep(0.01)
    assert fake.runs == [["1"], ["2", "4"], ["5"], ["3"]] and service.waiting == 0 and service.busy == 0


async def test_a_failing_batch_fails_its_requests_only(make):
    service, fake = make(max_batch=2, fail_on=frozenset({"3"}))
    running, _ = submit(service, 1, Urgency.COMMITTED)
    await until(lambda: len(fake.runs) == 1)
    tasks = [submit(service, label, Urgency.COMMITTED)[0] for label in (2, 3, 4)]
    await asyncio.sleep(0)
    fake.gate.release(3)
    results = await asyncio.gather(running, *tasks, return_exceptions=True)
    assert fake.runs == [["1"], ["2", "3"], ["4"]]
    assert [r.text for r in results if isinstance(r, Transcript)] == ["1", "4"]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 2 and all(isinstance(e, ModelError) and "failed" in str(e) for e in errors)
    # the service goes on
    again, _ = submit(service, 5, Urgency.COMMITTED)
    fake.gate.release()
    assert (await again).text == "5"


async def test_queue_wait_and_work_are_recorded_on_the_ticket(make):
    service, fake = make()
    clock = Clock()
    first, first_ticket = submit(service, 1, Urgency.COMMITTED, clock)
    await until(lambda: len(fake.runs) == 1)
    clock.now = 1.0
    second, ticket = submit(service, 2, Urgency.COMMITTED, clock)
    await asyncio.sleep(0)
    clock.now = 3.0
    fake.gate.release()
    await first
    await until(lambda: len(fake.runs) == 2)
    clock.now = 3.5
    fake.gate.release()
    await second
    assert first_ticket.queue_wait_s == 0.0 and first_ticket.work_s == 3.0
    assert ticket.submitted == 1.0 and ticket.queue_wait_s == 2.0 and ticket.work_s == 0.5


async def test_closing_fails_the_waiters_finishes_the_run_and_a_later_request_starts_it_again(make):
    service, fake = make()
    running, _ = submit(service, 1, Urgency.COMMITTED)
    await until(lambda: len(fake.runs) == 1)
    waiter, _ = submit(service, 2, Urgency.COMMITTED)
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(service.aclose())
    await asyncio.sleep(0)
    with pytest.raises(ModelError, match="closing"):
        await service.transcribe_async(np.ones(1600, np.float32))
    fake.gate.release()
    await closing
    assert (await running).text == "1"
    with pytest.raises(ModelError, match="closed"):
        await waiter
    assert fake.runs == [["1"]] and service.busy == 0
    again, _ = submit(service, 3, Urgency.COMMITTED)      # the engines outlive one server: it starts again
    fake.gate.release()
    assert (await again).text == "3"


def test_auto_workers_and_batch_follow_the_device():
    assert auto_workers(0, "cpu/int8") == 1 and auto_workers(0, "cuda/float16") == 2 and auto_workers(3, "cpu") == 3
    assert auto_max_batch(0, "cpu/int8") == 1 and auto_max_batch(0, "cuda:1/float16") == 8
    assert auto_max_batch(4, "cpu/int8") == 4
    with pytest.raises(ValueError):
        auto_workers(-1, "cpu")
