"""The LLM's continuous-batching scheduler (models/llm_batching.py) on a named fake of CTranslate2.

`FakeCt2Generator` behaves like ``ctranslate2.Generator.generate_batch`` in
the ways the scheduler depends on: one callback per member per decoding
step, a member leaves when its callback returns True, prompts longer than
the batch's shortest are *forced* (no callback) for the difference, and its
tokens are a deterministic function of the sequence so far, so a request
that was preempted and re-prefilled must produce exactly what it would have
alone.  Steps take no time; ``on_step(round, step)`` lets a test act at an
exact step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sub300.models.llm_batching import BatchRequest, BatchScheduler, collect, shared_static_prompt
from sub300.models.protocols import ModelError
from sub300.models.scheduling import Urgency, WorkTicket

STOP = 0


def next_token(sequence: list[int]) -> int:
    """The fake model: a token from the sequence so far (never the stop token before 1000 tokens)."""
    return (sum(sequence[-3:]) * 31 + len(sequence)) % 997 + 1


@dataclass
class Step:
    batch_id: int
    token_id: int
    is_last: bool = False


@dataclass
class FakeCt2Generator:
    """A named fake of `ctranslate2.Generator` (generate_batch with a step callback only)."""

    on_step: object = None
    fail_next: bool = False
    rounds: list[list[int]] = field(default_factory=list)     # prompt lengths of each call
    statics: list[list[int] | None] = field(default_factory=list)   # each call's static prompt
    steps: int = 0

    def generate_batch(self, prompts, *, max_length, callback, end_token, static_prompt=None, **_options):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (fake)")
        # a static prompt is the common start of every member's sequence (its state computed once)
        prefix = [int(t) for t in static_prompt] if static_prompt else []
        self.statics.append(prefix or None)
        sequences = [prefix + [int(t) for t in p] for p in prompts]
        self.rounds.append([len(p) for p in prompts])
        shortest = min(len(s) for s in sequences)
        forced = [len(s) - shortest for s in sequences]
        produced = [0] * len(sequences)
        left: set[int] = set()
        round_number = len(self.rounds)
        step = 0
        while len(left) < len(sequences):
            step += 1
            self.steps += 1
            if callable(self.on_step):
                self.on_step(round_number, step)
            for i, seq in enumerate(sequences):
                if i in left:
                    continue
                if forced[i] > 0:       # CTranslate2 feeds the rest of a longer prompt one step at a time
                    forced[i] -= 1
                    continue
                token = next_token(seq)
                seq.append(token)
                produced[i] += 1
                last = produced[i] >= max_length
                if callback(Step(i, token, last)) or last:
                    left.add(i)


def scheduler(generator: FakeCt2Generator, max_batch: int = 8, ahead: int = 1000) -> BatchScheduler:
    return BatchScheduler(generator, name="fake-llm", tokens_of=lambda ids: [str(i) for i in ids],
                          end_tokens=["0"], stop_ids=frozenset({STOP}), max_batch=max_batch, ahead=ahead)


class Consumer:
    """Collects one request's tokens (as text pieces) from the scheduler thread."""

    def __init__(self, sched: BatchScheduler, prompt: list[int], max_tokens: int, urgency: Urgency,
                 read: bool = True, static: tuple[int, ...] = ()):
        self.sched, self.read = sched, read
        self.pieces: list[str] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.ticket = WorkTicket(urgency)
        self.request = BatchRequest(prompt_ids=list(prompt), max_tokens=max_tokens, sampling=(("sampling_topk", 1),),
                                    ticket=self.ticket, decode=lambda t: f"{t} ", deliver=self._deliver,
                                    static_prompt=static)

    def _deliver(self, item: object) -> None:
        if isinstance(item, str):
            self.pieces.append(item)
            if self.read:
                self.sched.took(self.request)
            return
        self.error = getattr(item, "error", None)
        self.done.set()

    def submit(self) -> Consumer:
        self.sched.submit(self.request)
        return self

    def tokens(self) -> list[int]:
        return [int(p) for p in self.pieces]


def alone(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def test_a_committed_request_preempts_a_slack_round_within_a_step_and_the_slack_one_resumes_unchanged():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    slack = Consumer(sched, list(range(1, 41)), 30, Urgency.SLACK)
    urgent = Consumer(sched, list(range(100, 130)), 10, Urgency.COMMITTED)
    seen_at_arrival: list[int] = []

    def on_step(round_number: int, step: int) -> None:
        if round_number == 1 and step == 6:
            seen_at_arrival.append(len(slack.pieces))
            urgent.submit()
    gen.on_step = on_step
    slack.submit()
    assert urgent.done.wait(5) and slack.done.wait(5)
    sched.close()
    # the slack round ended at the step after the arrival; the committed request then ran alone
    assert gen.rounds[0] == [40]
    assert gen.rounds[1] == [30], gen.rounds
    assert seen_at_arrival == [5]
    assert len([t for t in slack.tokens()]) == 30
    # preempted and re-prefilled, it says exactly what it would have said alone
    assert slack.tokens() == alone(list(range(1, 41)), 30)
    assert urgent.tokens() == alone(list(range(100, 130)), 10)
    assert sched.reprefilled_tokens > 0
    assert urgent.ticket.queue_wait_s is not None and slack.ticket.work_s is not None


def test_requests_of_equal_length_decode_in_one_batch_and_one_leaves_alone():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    gate = threading.Event()
    first = Consumer(sched, [5] * 20, 25, Urgency.SLACK)
    second = Consumer(sched, [7] * 20, 25, Urgency.SLACK)
    # hold the thread on its first round until both are submitted
    gen.on_step = lambda r, s: gate.wait(5) if (r, s) == (1, 1) else None
    first.submit()
    second.submit()
    gate.set()
    cancelled_at: list[int] = []

    def cancel_second(round_number: int, step: int) -> None:
        if step == 10 and not cancelled_at:
            cancelled_at.append(step)
            sched.cancel(second.request)
    gen.on_step = cancel_second
    assert first.done.wait(5) and second.done.wait(5)
    sched.close()
    batched = [r for r in gen.rounds if len(r) == 2]
    assert batched, gen.rounds
    assert first.tokens() == alone([5] * 20, 25)
    assert len(second.tokens()) < 25           # it left at its cancel
    assert sched.batch_sizes.get(2, 0) >= 1


def test_a_consumer_that_stops_reading_pauses_the_thread_without_a_new_round():
    gen = FakeCt2Generator()
    sched = scheduler(gen, ahead=3)
    slow = Consumer(sched, [3] * 10, 12, Urgency.COMMITTED, read=False).submit()
    deadline = threading.Event()
    deadline.wait(0.2)
    assert len(slow.pieces) == 3 and not slow.done.is_set()    # paused after `ahead` unread pieces
    for _ in range(12):
        sched.took(slow.request)
    assert slow.done.wait(5)
    sched.close()
    assert slow.tokens() == alone([3] * 10, 12)
    assert len(gen.rounds) == 1                 # resumed in place: no re-prefill


def test_promotion_moves_a_speculative_request_ahead_of_a_slack_round():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    slack = Consumer(sched, [2] * 60, 40, Urgency.SLACK)
    spec = Consumer(sched, [9] * 10, 5, Urgency.SPECULATIVE)
    promoted: list[int] = []

    def on_step(round_number: int, step: int) -> None:
        if round_number == 1 and step == 2:
            spec.submit()              # too short to merge (forced steps): it waits behind the slack round
        if round_number == 1 and step == 8 and not promoted:
            promoted.append(len(slack.pieces))
            spec.ticket.urgency = Urgency.COMMITTED
    gen.on_step = on_step
    slack.submit()
    assert spec.done.wait(5) and slack.done.wait(5)
    sched.close()
    assert gen.rounds[1] == [10], gen.rounds   # it ran next, alone, right after its promotion
    assert promoted == [7]
    assert len(gen.rounds) == 3 and gen.rounds[2][0] > 60   # the slack one resumed after it, re-prefilled
    assert len(spec.tokens()) == 5 and slack.tokens() == alone([2] * 60, 40)


def test_a_failing_round_fails_its_requests_and_the_engine_serves_the_next():
    gen = FakeCt2Generator(fail_next=True)
    sched = scheduler(gen)
    failed = Consumer(sched, [1] * 5, 5, Urgency.COMMITTED).submit()
    assert failed.done.wait(5)
    assert isinstance(failed.error, ModelError) and "out of memory" in str(failed.error)
    assert collect(sched, lambda deliver: BatchRequest(
        prompt_ids=[4] * 5, max_tokens=3, sampling=(("sampling_topk", 1),), ticket=WorkTicket(),
        decode=lambda t: f"{t} ", deliver=deliver), timeout=5).split() == [str(t) for t in alone([4] * 5, 3)]
    sched.close()


def test_close_ends_running_requests_and_a_later_request_starts_afresh():
    gen = FakeCt2Generator()
    sched = scheduler(gen, ahead=1)
    held = Consumer(sched, [1] * 5, 50, Urgency.COMMITTED, read=False).submit()
    threading.Event().wait(0.05)
    sched.close()
    assert held.done.wait(5) and len(held.pieces) < 50
    again = Consumer(sched, [1] * 5, 3, Urgency.COMMITTED).submit()     # a later request starts a new thread
    assert again.done.wait(5) and again.tokens() == alone([1] * 5, 3)
    sched.close()


def test_a_slack_round_yields_to_committed_work_of_other_engines_and_a_committed_round_does_not():
    from sub300.models.scheduling import critical_path

    gen = FakeCt2Generator()
    sched = BatchScheduler(gen, name="fake-llm", tokens_of=lambda ids: [str(i) for i in ids], end_tokens=["0"],
                           stop_ids=frozenset({STOP}), yield_to_critical_path=True)
    with critical_path.counting(WorkTicket(Urgency.COMMITTED)):      # e.g. a final transcript being computed
        slack = Consumer(sched, [1] * 10, 20, Urgency.SLACK).submit()
        urgent = Consumer(sched, [2] * 10, 20, Urgency.COMMITTED)
        threading.Event().wait(0.1)
        assert len(slack.pieces) <= 1 and not slack.done.is_set()   # paused between steps
        urgent.submit()                                              # preempts the paused slack round
        assert urgent.done.wait(5)
    assert slack.done.wait(5)
    sched.close()
    assert slack.tokens() == alone([1] * 10, 20) and urgent.tokens() == alone([2] * 10, 20)
    assert sched.yielded_s > 0.05


def test_slack_rounds_are_formed_earliest_deadline_first_but_a_deadline_never_ends_a_round():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    gate = threading.Event()
    first = Consumer(sched, [1] * 10, 5, Urgency.COMMITTED)
    late = Consumer(sched, [2] * 80, 5, Urgency.SLACK)
    soon = Consumer(sched, [3] * 20, 5, Urgency.SLACK)
    late.ticket.deadline, soon.ticket.deadline = 50.0, 10.0
    gen.on_step = lambda r, s: gate.wait(5) if (r, s) == (1, 1) else None
    first.submit()                       # holds the thread while the two slack requests queue
    late.submit()
    soon.submit()
    gate.set()
    assert first.done.wait(5) and late.done.wait(5) and soon.done.wait(5)
    sched.close()
    assert gen.rounds == [[10], [20], [80]], gen.rounds     # the sooner deadline first; no restarts


def test_a_slack_round_that_yields_to_other_engines_still_progresses_duty_cycle():
    from sub300.models.scheduling import critical_path

    gen = FakeCt2Generator()
    sched = BatchScheduler(gen, name="fake-llm", tokens_of=lambda ids: [str(i) for i in ids], end_tokens=["0"],
                           stop_ids=frozenset({STOP}), yield_to_critical_path=True)
    # other engines do committed work without a break (many calls): the slack reply must still finish
    with critical_path.counting(WorkTicket(Urgency.COMMITTED)):
        slack = Consumer(sched, [1] * 10, 20, Urgency.SLACK).submit()
        finished = slack.done.wait(2.0)        # 20 steps at a 0.4 s pause each would take 8 s
    sched.close()
    assert finished and slack.tokens() == alone([1] * 10, 20)
    assert 0.3 < sched.yielded_s < 1.5


def test_a_stream_of_committed_arrivals_cannot_livelock_a_slack_round():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    slack = Consumer(sched, [1] * 50, 20, Urgency.SLACK)
    arrivals: list[Consumer] = []

    def on_step(round_number: int, step: int) -> None:
        # a new turn of another call right after every (re-)prefill of the slack round
        if step == 1 and gen.rounds[-1][0] >= 50 and len(arrivals) < 10:
            arrivals.append(Consumer(sched, [2] * 5, 1, Urgency.COMMITTED).submit())
    gen.on_step = on_step
    slack.submit()
    assert slack.done.wait(5) and all(a.done.wait(5) for a in arrivals)
    sched.close()
    assert slack.tokens() == alone([1] * 50, 20)
    slack_rounds = [r for r in gen.rounds if r[0] >= 50]
    assert len(slack_rounds) <= 6, gen.rounds        # at least 4 tokens per (re-)prefill


def test_a_shared_cached_prefix_is_fed_once_as_the_static_prompt_and_the_tokens_do_not_change():
    gen = FakeCt2Generator()
    sched = scheduler(gen)
    gate = threading.Event()
    system = (11, 12, 13, 14)
    first = Consumer(sched, [*system, 5, 6, 7], 12, Urgency.COMMITTED, static=system)
    second = Consumer(sched, [*system, 8, 9, 10], 12, Urgency.COMMITTED, static=system)
    other = Consumer(sched, [*system, 1, 2, 3], 12, Urgency.COMMITTED, static=(11, 12))   # another cached prefix
    gen.on_step = lambda r, s: gate.wait(5) if (r, s) == (1, 1) else None
    with sched._cond:   # (reentrant) the scheduler thread forms its first round only once all three wait:
        for consumer in (first, second, other):   # otherwise a loaded machine lets `first` start alone
            consumer.submit()
    gate.set()
    assert all(c.done.wait(5) for c in (first, second, other))
    sched.close()
    # the two with one prefix prefill together from it; a first token never waits on another prefix's round
    assert [3, 3] in gen.rounds and gen.statics[gen.rounds.index([3, 3])] == list(system)
    assert [5] in gen.rounds and gen.statics[gen.rounds.index([5])] == [11, 12]
    assert first.tokens() == alone([*system, 5, 6, 7], 12)
    assert second.tokens() == alone([*system, 8, 9, 10], 12)
    assert other.tokens() == alone([*system, 1, 2, 3], 12)
    assert sched.static_rounds == len(gen.rounds)


def test_a_round_uses_the_static_prompt_only_when_every_member_shares_it_and_goes_on_after_it():
    def request(prompt: list[int], static: tuple[int, ...]) -> BatchRequest:
        return BatchRequest(prompt_ids=prompt, max_tokens=4, sampling=(), ticket=WorkTicket(), decode=str,
                            deliver=lambda _item: None, static_prompt=static)
    system = (1, 2, 3)
    assert shared_static_prompt([request([1, 2, 3, 4], system), request([1, 2, 3, 5, 6], system)]) == system
    assert shared_static_prompt([request([1, 2, 3, 4], system), request([1, 2, 3, 5], ())]) == ()
    assert shared_static_prompt([request([1, 2, 3], system)]) == ()     # nothing after it to start from
