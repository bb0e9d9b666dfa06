"""Continuous batching with deadline classes for the embedded CTranslate2 LLM.

All of a process's generations advance together in one scheduler thread that
owns the `ctranslate2.Generator`: one batched decoding step produces a token
for every request in the running batch (a *round*).  Requests leave the
batch one by one (stop token, ``max_tokens``, cancel: the step callback
returns True for that batch index); a new request gets in at the next
decoding step, tens of ms, by ending the round and starting the next one
with it.

**What CTranslate2 allows, and the route taken.**  CTranslate2 cannot add an
entry to a batch that is already decoding (its maintainers say so in
OpenNMT/CTranslate2#1333) and exposes no KV cache.  So a round that a new
request joins is a new ``generate_batch`` call whose prompts are each
member's prompt plus what it generated so far: the members already running
are *re-prefilled*.  Two costs follow, measured on the bundled SmolLM2-135M,
2 CPU cores: a prefill costs ~1.3 ms per token (a decoding step ~22 ms for 1
or 2 sequences, 33 ms for 4, 54 ms for 8); and prompts of different lengths
are not padded but *forced* — CTranslate2 prefills the common length at once
and feeds each longer prompt's remaining tokens one decoding step at a time,
so a member longer than the shortest by d tokens makes no progress for d
steps.  The scheduler is built around both:

* a request still waiting for its first token (prefill phase) is batched
  only with requests of its own class and about its length
  (``PREFILL_LENGTH_TOLERANCE``), so its first token is never held behind
  forced steps or behind another call's re-prefill;
* a round on a caller's critical path (COMMITTED) is not restarted to let
  slack or speculative work in; a more urgent request ends any less urgent
  round at the next step (preemption), once that round has decoded
  ``MIN_ROUND_STEPS`` steps — without that, at 8 calls on 2 cores, slack
  rounds re-prefilled (seconds for 6 members with long histories), were
  preempted again before they decoded anything, and replies never finished;
  and a round's members feed at most ``max_round_tokens`` at its start;
* slack work is served earliest deadline first (the reply's
  `WorkTicket.deadline`: when its queued audio runs out) when a round is
  formed, but a deadline never ends a running round: a restart costs every
  member a re-prefill (~0.5 s for a late turn's prompt on this CPU), and
  slack rounds preempting each other by deadline made replies that never
  finished at 8 calls;
* a round of slack work (the rest of replies whose audio is still playing)
  is restarted to merge waiting requests whose length is within
  ``MAX_FORCED_STEPS`` of it — batched decoding is nearly free on this CPU
  (4 sequences cost 1.5x one) — but at most every ``MIN_ROUND_STEPS`` steps.

Flow control: each request's consumer may fall ``ahead`` pieces behind.  A
member whose consumer stopped reading keeps decoding (into its buffer) while
others in the round run; when *every* member of the round waits for its
consumer (the reply synthesizing its first clause), the thread pauses inside
the step callback, freeing the CPU for the TTS the caller waits for, and
resumes without a re-prefill.

Sharing the cores (``yield_to_critical_path``, on for a CPU placement): a
round with no COMMITTED member pauses between steps, up to ``MAX_YIELD_S``
and then runs at least as long as it paused (with many calls some engine is
always doing committed work: without that duty cycle slack replies starved),
while another engine does committed work (`models.scheduling.critical_path`:
a final transcript, a first piece's TTS), so the caller who waits is not
slowed by text that is only needed later.

A cached prefix (``BatchRequest.static_prompt``): CTranslate2's
``generate_batch(static_prompt=…)`` runs a fixed prefix once (batch 1),
keeps the decoder state after it (``cache_static_prompt``: a map in the
model replica that is never evicted) and starts every member of the call
from a copy of it, so only the rest of each prompt is prefilled.  One static
prompt per call, so a round uses it only when every member's prompt begins
with the same one; a prefill-phase request joins only requests with its own
prefix (its first token is what the cache is for), while decoding members
with different prefixes may share a round, which then feeds whole prompts.
Measured on the bundled SmolLM2-135M, 2 CPU cores, the 22-token prefix of
the default system prompt: time to first token p50 158 → 99 ms through the engine, greedy
tokens identical (scripts/bench_llm_prefix.py).  The model decides which
prefixes are cached (models/llm_ct2.py: a bounded set, never a caller's
arbitrary system prompt).

Deadline classes and queue wait: each request carries a
`models.scheduling.WorkTicket`; its urgency is read at every decision, so a
speculative reply promoted to COMMITTED moves ahead at once.  The ticket is
marked started when the request first enters a round.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from .protocols import ModelError
from .scheduling import Urgency, WorkTicket, critical_path
from .threads import StreamEnd

log = logging.getLogger(__name__)

#: text pieces a request may run ahead of its consumer before it counts as waiting for it
AHEAD = 4
#: a prefill-phase request is batched with others of its class only if their lengths differ by at most this (tokens)
PREFILL_LENGTH_TOLERANCE = 8
#: a slack round merges a request whose length differs from the round's shortest by at most this (tokens = forced steps)
MAX_FORCED_STEPS = 24
#: a slack round runs at least this many steps before it is restarted to merge waiting requests
MIN_ROUND_STEPS = 4
#: a request whose ticket the engine made (no caller's ticket: the OpenAI-compatible API, ``complete``) is
#: COMMITTED for its first tokens and SLACK after this many (tokens; about a first clause)
AUTO_SLACK_AFTER_TOKENS = 8
#: longest pause of a round without committed members while other engines do committed work (seconds);
#: bounded so that slack work cannot starve past the audio that covers it
MAX_YIELD_S = 0.4


@dataclass(eq=False)
class BatchRequest:
    """One generation: ``prompt_ids`` (token ids), sampled by ``sampling`` up to ``max_tokens`` new tokens.

    ``decode(token_id) -> str`` turns a new token into text ("" while a
    character is incomplete); ``deliver(item)`` hands a text piece or the end
    to the consumer from the scheduler thread (thread-safe).
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[tuple[str, Any], ...]
    ticket: WorkTicket
    decode: Callable[[int], str]
    deliver: Callable[[object], None]
    order: int = 0
    generated: list[int] = field(default_factory=list)
    unread: int = 0                 # pieces delivered but not yet taken by the consumer
    cancelled: bool = False
    finished: bool = False
    #: the engine made the ticket: it turns SLACK after ``AUTO_SLACK_AFTER_TOKENS`` (no caller manages it)
    auto_slack: bool = False
    #: a prefix of ``prompt_ids`` whose decoder state CTranslate2 caches (``static_prompt``); () = none
    static_prompt: tuple[int, ...] = ()
    #: the model sampled one of the stop ids (not in ``generated``: it has no text, yet it was computed)
    sampled_stop: bool = False

    @property
    def completion_tokens(self) -> int:
        """Tokens this request generated so far: ``generated`` plus a sampled stop token (the usage
        of models/protocols.py `LlmUsage`; readable from any thread, the list only grows)."""
        return len(self.generated) + self.sampled_stop

    @property
    def length(self) -> int:
        """Tokens the next round must feed: prompt plus what was generated."""
        return len(self.prompt_ids) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        return not self.generated

    @property
    def live(self) -> bool:
        return not (self.finished or self.cancelled)

    def sort_key(self) -> tuple[tuple[int, float], int]:
        return (self.ticket.rank(), self.order)


class _Round:
    """The members of one ``generate_batch`` call and its stop decision."""

    def __init__(self, members: list[BatchRequest]) -> None:
        self.members = members
        self.steps = 0
        self.stopping = False
        self.ran_since = time.monotonic()     # the end of the last pause for other engines' committed work
        self.yielded_last = 0.0               # how long that pause was (seconds)
        self.left: set[int] = set()     # batch indices that returned True


class BatchScheduler:
    """Runs every generation of one CTranslate2 ``Generator`` in one thread, batched.

    ``tokens_of(ids) -> list[str]`` maps ids to the token strings that
    ``generate_batch`` takes; ``end_tokens`` and ``stop_ids`` end a
    generation; ``max_batch`` bounds a round's size (memory on a GPU, step
    time on a CPU).  Statistics for benchmarks: ``rounds``,
    ``reprefilled_tokens`` (prompt tokens fed again because a round was
    restarted), ``batch_sizes`` (histogram: size → rounds).
    """

    def __init__(self, generator: Any, *, name: str, tokens_of: Callable[[list[int]], list[str]],
                 end_tokens: list[str], stop_ids: frozenset[int], max_batch: int = 8, ahead: int = AHEAD,
                 yield_to_critical_path: bool = False, max_round_tokens: int = 1 << 30) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}")
        self._generator = generator
        self.name = name
        self._tokens_of = tokens_of
        self._end_tokens = end_tokens
        self._stop_ids = stop_ids
        self.max_batch = max_batch
        self.max_round_tokens = max_round_tokens
        self.ahead = ahead
        self.yield_to_critical_path = yield_to_critical_path
        #: seconds rounds spent paused for other engines' committed work
        self.yielded_s = 0.0
        self._cond = threading.Condition()
        self._requests: list[BatchRequest] = []
        self._round: _Round | None = None
        self._order = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.rounds = 0
        #: rounds that started from a cached prefix (``static_prompt``)
        self.static_rounds = 0
        self.reprefilled_tokens = 0
        self.batch_sizes: dict[int, int] = {}

    # ------------------------------------------------------------ the consumer's side (any thread)
    def submit(self, request: BatchRequest) -> None:
        with self._cond:
            if self._closed:
                raise ModelError(f"{self.name}: the engine is closed")
            request.order = next(self._order)
            request.ticket.mark_submitted()
            self._requests.append(request)
            request.ticket.on_change(lambda _ticket: self._wake())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"llm-batch-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def took(self, request: BatchRequest) -> None:
        """The consumer took one delivered piece."""
        with self._cond:
            request.unread -= 1
            self._cond.notify_all()

    def cancel(self, request: BatchRequest) -> None:
        """Stop ``request`` at its next step (or drop it if it waits); idempotent."""
        with self._cond:
            request.cancelled = True
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Requests not in the running round (for metrics)."""
        with self._cond:
            running = set(map(id, self._round.members)) if self._round else set()
            return sum(1 for r in self._requests if r.live and id(r) not in running)

    @property
    def active(self) -> int:
        with self._cond:
            return sum(1 for r in self._requests if r.live)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: running requests end at their next step, waiting ones with an error.

        Requests submitted while it closes are refused; a later request starts
        a new thread (the engines outlive an app that closed them, as in tests).
        """
        with self._cond:
            self._closed = True
            for request in self._requests:
                request.cancelled = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: the batching thread did not stop within %.0f s", self.name, timeout)
                return
        with self._cond:
            self._thread = None
            self._closed = False

    # ------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        while True:
            with self._cond:
                members = self._next_round()
                while not members and not self._closed:
                    self._cond.wait()
                    members = self._next_round()
                if self._closed and not members:
                    self._end_all(ModelError(f"{self.name}: the engine closed"))
                    return
                round_ = self._round = _Round(members)
            try:
                self._decode(round_)
            except BaseException as error:   # a failed round fails its members, not the engine
                failure = error if isinstance(error, ModelError) else ModelError(
                    f"{self.name} generation failed: {error}")
                with self._cond:
                    for request in round_.members:
                        if request.live:
                            request.finished = True
                            request.deliver(StreamEnd(failure))
            finally:
                with self._cond:
                    self._round = None
                    self._settle(round_)

    def _end_all(self, error: ModelError) -> None:
        for request in self._requests:
            if not request.finished:
                request.finished = True
                request.deliver(StreamEnd(error))
        self._requests.clear()

    def _settle(self, round_: _Round) -> None:
        """After a round: requests that CTranslate2 ended (an end token, the length) are finished."""
        for index, request in enumerate(round_.members):
            if request.live and index not in round_.left and not round_.stopping:
                self._finish(request)
        for request in [r for r in self._requests if r.cancelled and not r.finished]:
            request.finished = True
            request.ticket.mark_finished()
            request.deliver(StreamEnd())
        self._requests = [r for r in self._requests if not r.finished]

    def _finish(self, request: BatchRequest) -> None:
        request.finished = True
        request.ticket.mark_finished()
        request.deliver(StreamEnd())

    def _next_round(self) -> list[BatchRequest]:
        """The members of the next round (under the lock); [] when nothing can run."""
        self._requests = [r for r in self._requests if not r.finished]
        for request in self._requests:
            if request.cancelled and not request.finished:
                request.finished = True
                request.ticket.mark_finished()
                request.deliver(StreamEnd())
        candidates = sorted((r for r in self._requests if r.live), key=BatchRequest.sort_key)
        if not candidates:
            return []
        anchor = candidates[0]
        members = [anchor]
        tokens = anchor.length
        for request in candidates[1:]:
            if len(members) >= self.max_batch:
                break
            if tokens + request.length > self.max_round_tokens:
                continue        # its (re-)prefill would hold up the whole round
            if self._may_join(request, members):
                members.append(request)
                tokens += request.length
        return members

    def _may_join(self, request: BatchRequest, members: list[BatchRequest]) -> bool:
        """Whether ``request`` may join a round of ``members`` (anchor first) without hurting them.

        Members longer than the round's shortest are forced for the
        difference (see the module docstring), so the spread of lengths is
        what joining costs.
        """
        anchor = members[0]
        if request.sampling != anchor.sampling:
            return False
        if anchor.prefilling:
            # protect the first token: same class, same phase, about the same length, the same cached prefix
            return (request.prefilling and request.ticket.urgency == anchor.ticket.urgency
                    and request.static_prompt == anchor.static_prompt
                    and abs(request.length - anchor.length) <= PREFILL_LENGTH_TOLERANCE)
        shortest = min(m.length for m in members)
        longest = max(m.length for m in members)
        if anchor.ticket.urgency == Urgency.COMMITTED and request.length < shortest:
            return False    # it would force the committed members for the difference
        return max(longest, request.length) - min(shortest, request.length) <= MAX_FORCED_STEPS

    def _should_restart(self, round_: _Round) -> bool:
        """A request outside the round deserves a new round now (under the lock)."""
        running = [m for i, m in enumerate(round_.members) if i not in round_.left and m.live]
        if not running:
            return False
        best = min(m.ticket.urgency for m in running)
        inside = set(map(id, round_.members))
        outside = [r for r in self._requests if r.live and id(r) not in inside]
        if not outside:
            return False
        if best != Urgency.COMMITTED and round_.steps < MIN_ROUND_STEPS:
            return False         # a round that paid its (re-)prefill first makes some progress
        if any(r.ticket.urgency < best for r in outside):
            return True          # preemption: more urgent work waits
        if best == Urgency.COMMITTED or round_.steps < MIN_ROUND_STEPS or len(running) >= self.max_batch:
            return False
        return any(self._may_join(r, sorted(running, key=BatchRequest.sort_key)) for r in outside)

    def _decode(self, round_: _Round) -> None:
        members = round_.members
        static = shared_static_prompt(members)
        options: dict[str, Any] = {"static_prompt": self._tokens_of(list(static))} if static else {}
        prompts: list[list[str]] = []
        for request in members:
            if not request.prefilling:
                self.reprefilled_tokens += request.length - len(static)
            request.ticket.mark_started()
            prompts.append(self._tokens_of((request.prompt_ids + request.generated)[len(static):]))
        self.static_rounds += bool(static)
        self.rounds += 1
        self.batch_sizes[len(members)] = self.batch_sizes.get(len(members), 0) + 1
        sampling = dict(members[0].sampling)
        max_length = max(r.max_tokens - len(r.generated) for r in members)
        callback_error: list[BaseException] = []

        def on_step(step: Any) -> bool:
            try:
                return self._on_step(round_, step)
            except BaseException as exc:  # never let an exception cross into C++
                callback_error.append(exc)
                round_.stopping = True
                return True

        log.debug("%s: round %d: %d members, lengths %s", self.name, self.rounds, len(members),
                  [m.length for m in members])
        self._generator.generate_batch(
            prompts,
            max_length=max(1, max_length),
            beam_size=1,
            include_prompt_in_result=False,
            end_token=self._end_tokens,
            callback=on_step,
            **sampling,
            **options,
        )
        if callback_error:
            raise ModelError(f"{self.name} streaming failed: {callback_error[0]}") from callback_error[0]

    def _on_step(self, round_: _Round, step: Any) -> bool:
        """One token for one member; True = this member leaves the round."""
        index = step.batch_id
        request = round_.members[index]
        with self._cond:
            if index == min(set(range(len(round_.members))) - round_.left, default=index):
                round_.steps += 1
            if request.cancelled or self._closed:
                round_.left.add(index)
                return True
            token = step.token_id
            if token in self._stop_ids:
                request.sampled_stop = True
                round_.left.add(index)
                self._finish(request)
                return True
            request.generated.append(token)
            if request.auto_slack and len(request.generated) == AUTO_SLACK_AFTER_TOKENS:
                request.ticket.urgency = Urgency.SLACK
            piece = request.decode(token)
            if piece:
                request.unread += 1
                request.deliver(piece)
            if len(request.generated) >= request.max_tokens or step.is_last:
                round_.left.add(index)
                self._finish(request)
                return True
            if round_.stopping or self._should_restart(round_):
                round_.stopping = True
                round_.left.add(index)
                return True
            self._pause_while_all_wait(round_)
            self._yield_to_critical_path(round_)
            if round_.stopping or request.cancelled or self._closed:
                round_.stopping = round_.stopping or not request.cancelled
                round_.left.add(index)
                return True
            return False

    def _yield_to_critical_path(self, round_: _Round) -> None:
        """Pause (under the lock) a round without committed members while other engines do committed work."""
        if not self.yield_to_critical_path or not critical_path.busy:
            return
        if any(m.ticket.urgency == Urgency.COMMITTED for i, m in enumerate(round_.members) if i not in round_.left):
            return
        start = time.monotonic()
        if start - round_.ran_since < round_.yielded_last:
            return      # duty cycle: run at least as long as the last pause, so slack work cannot starve
        while critical_path.busy and time.monotonic() - start < MAX_YIELD_S and not self._closed:
            if self._should_restart(round_):
                round_.stopping = True
                break
            self._cond.wait(0.005)
        round_.ran_since = time.monotonic()
        round_.yielded_last = round_.ran_since - start
        self.yielded_s += round_.yielded_last

    def _pause_while_all_wait(self, round_: _Round) -> None:
        """Block (under the lock) while every running member waits for its consumer and nothing else is due."""
        while True:
            running = [m for i, m in enumerate(round_.members) if i not in round_.left and m.live]
            if not running or any(m.unread < self.ahead for m in running) or self._closed:
                return
            if self._should_restart(round_):
                round_.stopping = True
                return
            self._cond.wait(0.5)


def shared_static_prompt(members: list[BatchRequest]) -> tuple[int, ...]:
    """The cached prefix a round of ``members`` starts from: theirs when all share one and every
    prompt goes on after it (CTranslate2 needs start tokens after the static prompt), else ()."""
    static = members[0].static_prompt
    if not static or any(m.static_prompt != static or m.length <= len(static) for m in members):
        return ()
    return static


def open_stream(scheduler: BatchScheduler,
                make_request: Callable[[Callable[[object], None]], BatchRequest]) -> AsyncGenerator[str, None]:
    """The consumer's side of one request: an async generator of text pieces.

    Closing or cancelling it cancels the request (it leaves the batch at the
    next step); an error of its round is raised here as `ModelError`.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def deliver(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:          # the loop is closed: nobody listens any more
            pass

    request = make_request(deliver)

    async def pieces() -> AsyncGenerator[str, None]:
        scheduler.submit(request)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, StreamEnd):
                    if item.error is not None:
                        raise item.error
                    return
                scheduler.took(request)
                yield item  # type: ignore[misc]
        finally:
            scheduler.cancel(request)

    return pieces()


def sampling_options(temperature: float) -> tuple[tuple[str, Any], ...]:
    """CTranslate2 sampling keywords for ``temperature`` (0 = greedy), hashable so that rounds group by them."""
    if temperature and temperature > 0:
        return (("sampling_topk", 50), ("sampling_topp", 0.95), ("sampling_temperature", float(temperature)))
    return (("sampling_topk", 1),)


def collect(scheduler: BatchScheduler, make_request: Callable[[Callable[[object], None]], BatchRequest],
            timeout: float | None = None) -> str:
    """Blocking: run one request to its end from a non-event-loop thread; its text."""
    pieces: list[str] = []
    done = threading.Event()
    failure: list[BaseException] = []

    def deliver(item: object) -> None:
        if isinstance(item, StreamEnd):
            if item.error is not None:
                failure.append(item.error)
            done.set()
        else:
            pieces.append(str(item))
            scheduler.took(request)

    request = make_request(deliver)
    scheduler.submit(request)
    if not done.wait(timeout):
        scheduler.cancel(request)
        raise ModelError(f"{scheduler.name}: no answer within {timeout} s")
    if failure:
        raise failure[0]
    return "".join(pieces)

