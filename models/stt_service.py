"""The shared speech-recognition service: one queue for every call, served by deadline class.

`ScheduledRecognizer` wraps a blocking `SpeechRecognizer` (Whisper) that all
calls share.  Each request carries a `WorkTicket` (models/scheduling.py);
waiting requests are served by (``ticket.urgency``, arrival), the urgency
read when a worker frees, so a speculative early final promoted to COMMITTED
when its turn ends moves ahead of partial transcripts (SLACK) of other calls.

* **Workers.**  At most ``workers`` engine runs at once, each in a thread of
  the service's own pool (CTranslate2 releases the GIL).  On a small CPU one
  run at a time is fastest: two concurrent Whisper runs share the same cores
  and each takes about twice as long.
* **Batching.**  When the engine can batch (it has
  ``transcribe_batch(list[np.ndarray]) -> list[Transcript]``, as
  `WhisperRecognizer` does) and several requests wait when a worker frees,
  the worker takes up to ``max_batch`` of them, the most urgent first, into
  one call.  A lone waiter runs alone (``transcribe``).  A batch holds
  requests of one deadline class only (the most urgent waiting): a batched
  call costs more than a single one, and a committed final must not pay for
  other calls' partials riding along.
* **Cancellation.**  A waiter that is cancelled leaves the queue and costs
  nothing; a request whose run has started cannot stop the engine (a
  CTranslate2 call is not interruptible): its result is dropped and the run
  finishes for the other requests in its batch.
* **Errors.**  A run that fails fails each of its requests with the engine's
  `ModelError` (any other exception is wrapped in one and logged); requests
  in other runs are unaffected.
* **Tickets.**  ``mark_submitted`` on arrival, ``mark_started`` when its run
  starts, ``mark_finished`` when the run ends: the ledger tells the queue
  wait apart from the work.

The blocking ``transcribe`` passes straight through to the engine (warm-up,
scripts).  One service serves one event loop at a time.  `aclose` fails the
waiters, refuses new requests while it waits for the runs in flight, and
stops the threads; a request after that starts them again (the engines live
as long as the process, and a server or test that closes them may be
followed by another that uses them).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .protocols import ModelError, SpeechRecognizer, Transcript
from .scheduling import Urgency, WorkTicket, critical_path

log = logging.getLogger(__name__)

#: engine runs at once when ``workers`` is 0 (auto): one on a CPU (concurrent runs only share the
#: cores), two on a GPU (one run's CPU-side work — features, decoding loop — overlaps the other's kernels)
AUTO_WORKERS = {"cpu": 1, "cuda": 2}
#: requests per batched call when ``max_batch`` is 0 (auto).  CPU: no batching.  Measured with
#: scripts/bench_stt_batch.py (tiny.en int8, window padding, 2-core EPYC, 2026-11-29): one batched
#: call of 4 clips costs 0.64x the 4 one after another (2: 0.84x), but when 4 finals arrive at once
#: the per-request latency is p50 445 / p95 635 ms batched against 406 / 697 ms one by one (2: the
#: same), and a batch in flight holds the one CPU worker for its whole length (~430 ms for 4 against
#: ~150 ms for one clip), which is how long a committed final that arrives just after waits.
#: Batching stays available (stt.max_batch).  CUDA: 8, not measured here; on a GPU a batch of
#: short clips costs little more than one (the small encoder does not fill the device).
AUTO_MAX_BATCH = {"cpu": 1, "cuda": 8}


def _device_kind(device: str) -> str:
    """"cuda" for a device string such as "cuda/float16" or "cuda:1/int8", else "cpu"."""
    return "cuda" if device.split("/", 1)[0].split(":", 1)[0] == "cuda" else "cpu"


def auto_workers(workers: int, device: str) -> int:
    """``workers``, or the device's default when it is 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = auto), got {workers!r}")
    return workers or AUTO_WORKERS[_device_kind(device)]


def auto_max_batch(max_batch: int, device: str) -> int:
    """``max_batch``, or the device's default when it is 0."""
    if max_batch < 0:
        raise ValueError(f"max_batch must be >= 0 (0 = auto), got {max_batch!r}")
    return max_batch or AUTO_MAX_BATCH[_device_kind(device)]


@dataclass(eq=False)
class _Request:
    audio: np.ndarray
    ticket: WorkTicket
    order: int
    future: asyncio.Future[Transcript] = field(repr=False)

    def key(self) -> tuple[Urgency, int]:
        return self.ticket.urgency, self.order


class ScheduledRecognizer:
    """A `SpeechRecognizer` shared by all calls: a priority queue in front of a blocking engine.

    ``workers``: engine runs at once (>= 1).  ``max_batch``: requests per run
    (>= 1; above 1 only used when the engine has ``transcribe_batch``).
    ``waiting`` (queued requests) and ``busy`` (runs in flight) are for
    metrics and admission.  Errors: `ModelError` from the engine, or when the
    service is closed.
    """

    def __init__(self, recognizer: SpeechRecognizer, *, workers: int = 1, max_batch: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}")
        self.recognizer = recognizer
        self.name: str = recognizer.name
        self.device: str = recognizer.device
        self.workers = workers
        batch: Callable[[list[np.ndarray]], list[Transcript]] | None = getattr(recognizer, "transcribe_batch", None)
        self._batch = batch if max_batch > 1 else None
        self.max_batch = max_batch if batch is not None else 1
        if max_batch > 1 and batch is None:
            log.info("stt: %s cannot batch; max_batch=%d ignored", self.name, max_batch)
        self._queue: list[_Request] = []
        self._runs: set[asyncio.Task[None]] = set()
        self._order = itertools.count()
        self._pool: ThreadPoolExecutor | None = None      # started by the first run
        self._closing = False

    # ------------------------------------------------------------ the SpeechRecognizer protocol
    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Blocking, straight to the engine, outside the queue (warm-up, scripts)."""
        return self.recognizer.transcribe(audio)

    async def transcribe_async(self, audio: np.ndarray, *, ticket: WorkTicket | None = None) -> Transcript:
        """Queue ``audio`` (float32 mono 16 kHz) behind more urgent work; the engine's transcript."""
        if self._closing:
            raise ModelError(f"{self.name}: the recognition service is closing")
        ticket = ticket if ticket is not None else WorkTicket(Urgency.COMMITTED, label="stt")
        ticket.mark_submitted()
        request = _Request(audio, ticket, next(self._order), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._dispatch()
        try:
            return await request.future
        finally:
            if request in self._queue:          # cancelled while waiting: leave no trace
                self._queue.remove(request)

    # ------------------------------------------------------------ metrics
    @property
    def waiting(self) -> int:
        """Requests queued, not yet in a run."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Engine runs in flight."""
        return sum(1 for run in self._runs if not run.done() and not run.get_loop().is_closed())

    # ------------------------------------------------------------ scheduling
    def _dispatch(self) -> None:
        """Start runs while a worker is free and requests wait: the most urgent first."""
        self._queue = [r for r in self._queue if not r.future.done() and not r.future.get_loop().is_closed()]
        while self._queue and self.busy < self.workers and not self._closing:
            self._queue.sort(key=_Request.key)
            take = self.max_batch if self._batch is not None else 1
            head = self._queue[0].ticket.urgency      # a batch holds one deadline class (see the module doc)
            batch = [r for r in self._queue[:take] if r.ticket.urgency == head]
            self._queue = self._queue[len(batch):]
            run = asyncio.get_running_loop().create_task(self._run(batch), name="stt-run")
            self._runs.add(run)
            run.add_done_callback(self._run_done)

    def _run_done(self, run: asyncio.Task[None]) -> None:
        self._runs.discard(run)
        if not run.cancelled() and (error := run.exception()) is not None:
            log.error("stt: a run crashed: %r", error)     # _run settles its futures; this is a bug
        if not run.get_loop().is_closed():
            self._dispatch()

    async def _run(self, batch: list[_Request]) -> None:
        for request in batch:
            request.ticket.mark_started()
        audios = [r.audio for r in batch]
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="stt")
        # a committed transcription counts on the critical path (the LLM's slack rounds yield the cores to it)
        most_urgent = min((r.ticket for r in batch), key=lambda t: t.urgency)
        try:
            with critical_path.counting(most_urgent):
                results = await self._transcribe(loop, batch, audios)
        except asyncio.CancelledError:          # the loop is shutting down: so are the waiters
            for request in batch:
                request.future.cancel()
            raise
        except Exception as exc:
            error = exc if isinstance(exc, ModelError) else ModelError(f"{self.name}: recognition failed: {exc!r}")
            if not isinstance(exc, ModelError):
                log.error("stt: %s failed a run of %d: %r", self.name, len(batch), exc)
            for request in batch:
                request.ticket.mark_finished()
                if not request.future.done():
                    request.future.set_exception(error)
            return
        for request, result in zip(batch, results, strict=True):
            request.ticket.mark_finished()
            if not request.future.done():       # a cancelled request's result is dropped
                request.future.set_result(result)

    async def _transcribe(self, loop: asyncio.AbstractEventLoop, batch: list[_Request],
                          audios: list[np.ndarray]) -> Sequence[Transcript]:
        assert self._pool is not None
        if len(batch) == 1:
            return [await loop.run_in_executor(self._pool, self.recognizer.transcribe, audios[0])]
        assert self._batch is not None
        results = await loop.run_in_executor(self._pool, self._batch, audios)
        if len(results) != len(batch):
            raise ModelError(f"{self.name}: transcribe_batch gave {len(results)} results for {len(batch)}")
        return results

    # ------------------------------------------------------------ lifetime
    async def aclose(self) -> None:
        """Fail the waiters (`ModelError`), let the runs in flight finish, stop the threads."""
        self._closing = True
        try:
            for request in self._queue:
                if not request.future.done():
                    request.future.set_exception(ModelError(f"{self.name}: the recognition service closed"))
            self._queue.clear()
            runs = [run for run in self._runs if not run.get_loop().is_closed()]
            if runs:
                await asyncio.gather(*runs, return_exceptions=True)
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
        finally:
            self._closing = False
