"""`RecordsObserver`: writes each call, turn and usage event to the records store, off the event loop.

A `CallObserver` (agent/calls.py) and a `ModelUsageSink` (agent/usage.py).
The event loop only queues: every write goes to **one writer thread** that
commits each record in its own transaction as it comes, so a ``kill -9``
loses at most the record in flight (and what is still queued: normally
nothing, a turn is written within milliseconds).  A failing database never
breaks a call: the writer logs each lost record, counts them (``lost``)
and calls ``on_lost`` hooks (a metric).  The same thread runs retention
(`RecordStore.purge`) at start and then hourly while the observer lives.

Written per call: the call's row at `call_started` (with its `CallContext`:
API key, source, record_audio), one ``turns`` row per `TurnFinished`
(answered) / `TurnFailed` (failed) / `TurnDiscarded` (discarded) with the
turn's usage (``TurnLedger.usage``) as usage event ``<call_id>/turn/<n>``,
the ledger updated when the caller's `TurnHeard` comes, the remainder of the
call's usage (a `CallUsage` event, kind "call_usage") as ``<call_id>/end``,
and the end time and cause at `call_ended`.  Transcripts, replies and
error lines are redacted (``records.redact``) before they are queued.

A recorded call's WAV (agent/recording.py, `CallRecorded`) is kept as the
call's ``recording_path``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..calls import CallContext
from ..events import CallRecorded, Event, TurnDiscarded, TurnFailed, TurnFinished, TurnHeard
from .redaction import Redactor
from .store import RecordStore

log = logging.getLogger(__name__)

#: seconds between retention runs (the first runs when the writer starts)
PURGE_INTERVAL_S = 3600.0
#: records the queue holds at most while the database is slow or down; more are counted lost (bounded memory)
MAX_QUEUED = 10_000
_STOP = object()


@dataclass
class _Call:
    transport: str
    key_id: str | None


class RecordsObserver:
    """Queues records of calls and model requests to ``store``; ``config``: a `Config` or `RecordsConfig`.

    ``clock``: wall clock, Unix epoch seconds (tests pass their own).
    ``purge_interval_s``: None disables the periodic retention here (``sub300 records purge`` still works).
    """

    def __init__(self, store: RecordStore, config: Any, clock: Callable[[], float] = time.time,
                 purge_interval_s: float | None = PURGE_INTERVAL_S) -> None:
        records = getattr(config, "records", config)
        self.store = store
        self.clock = clock
        self.redact = Redactor(records.redact)
        self.retention_s = records.retention_days * 86_400.0 if records.retention_days > 0 else None
        self.record_audio = records.record_audio
        self.purge_interval_s = purge_interval_s if self.retention_s is not None else None
        self.lost = 0
        self.written = 0
        self.on_lost: list[Callable[[int], None]] = []
        self._calls: dict[str, _Call] = {}
        self._queue: queue.Queue[Any] = queue.Queue(MAX_QUEUED)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ CallObserver
    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        context = context or CallContext()
        self._calls[call_id] = _Call(transport, context.key_id)
        self._submit(f"call {call_id} start", self.store.call_started, call_id, transport, self.clock(),
                     context.key_id, context.source, bool(context.record_audio or self.record_audio))
        return lambda event: self._on_event(call_id, event)

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        self._calls.pop(call_id, None)
        self._submit(f"call {call_id} end", self.store.call_ended, call_id, self.clock(), reason)

    def _on_event(self, call_id: str, event: Event) -> None:
        call = self._calls.get(call_id)
        key_id = call.key_id if call is not None else None
        at = self.clock()
        if isinstance(event, TurnFinished):
            self._turn(call_id, key_id, event.turn, at, "answered", event.transcript, event.reply, event.ledger)
        elif isinstance(event, TurnFailed):
            self._turn(call_id, key_id, event.turn, at, "failed", event.transcript, event.reply, event.ledger,
                       error=event.error, stage=event.stage)
        elif isinstance(event, TurnDiscarded):
            self._turn(call_id, key_id, event.turn, at, "discarded", None, None, None, error=event.reason)
        elif isinstance(event, TurnHeard):
            self._submit(f"call {call_id} turn {event.turn} heard", self.store.update_ledger, call_id, event.turn,
                         self._ledger(event.ledger))
        elif isinstance(event, CallRecorded):
            self._submit(f"call {call_id} recording", self.store.set_recording, call_id, event.path)
        elif getattr(event, "kind", None) == "call_usage":   # agent.events.CallUsage: the call's remainder
            usage = dict(getattr(event, "usage", {}) or {})
            if any(usage.values()):
                self._submit(f"call {call_id} usage", self.store.add_usage, f"{call_id}/end", "call_end", at,
                             usage, key_id, call_id)

    def _turn(self, call_id: str, key_id: str | None, turn: int, at: float, outcome: str, transcript: str | None,
              reply: str | None, ledger, error: str | None = None, stage: str | None = None) -> None:
        usage = dict(getattr(ledger, "usage", None) or {})
        self._submit(f"call {call_id} turn {turn}", self.store.add_turn, call_id, turn, at, outcome,
                     self.redact(transcript), self.redact(reply), self._ledger(ledger),
                     self.redact(error), stage, usage, key_id)

    def _ledger(self, ledger) -> dict[str, Any] | None:
        """The ledger's dict with every string redacted (notes carry text: a backchannel's words, the
        unspoken rest of a reply, why a turn was discarded)."""
        return None if ledger is None else self._redacted(ledger.to_dict())

    def _redacted(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._redacted(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redacted(v) for v in value]
        return value

    # ------------------------------------------------------------ ModelUsageSink
    def model_request(self, key_id: str | None, source: str | None, route: str,
                      usage: Mapping[str, float], status: int) -> None:
        """One /v1/* request's usage as event ``model/<request id>`` (a fresh id per request)."""
        if any(usage.values()):
            self._submit(f"model request {route}", self.store.add_usage, f"model/{uuid.uuid4().hex}", "model",
                         self.clock(), dict(usage), key_id, None)

    # ------------------------------------------------------------ the writer
    def _submit(self, what: str, write: Callable[..., Any], *args: Any) -> None:
        if self._closed:
            self._lose(what, RuntimeError("the records observer is closed"))
            return
        try:
            self._queue.put_nowait((what, write, args))
        except queue.Full:
            self._lose(what, RuntimeError(f"{MAX_QUEUED} records already wait for the database"))

    def _run(self) -> None:
        next_purge = time.monotonic() if self.purge_interval_s is not None else None
        while True:
            timeout = None if next_purge is None else max(0.0, next_purge - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._queue.task_done()
                return
            if item is None:   # time for retention
                assert self.retention_s is not None and self.purge_interval_s is not None
                next_purge = time.monotonic() + self.purge_interval_s
                try:
                    counts = self.store.purge(self.clock() - self.retention_s)
                    if any(counts.values()):
                        log.info("records retention: removed the text of %d turns and %d recordings",
                                 counts["turns"], counts["recordings"])
                except Exception as error:
                    log.error("records retention failed: %s: %s", type(error).__name__, error)
                continue
            what, write, args = item
            try:
                write(*args)
                self.written += 1
            except Exception as error:
                self._lose(what, error)
            finally:
                self._queue.task_done()

    def _lose(self, what: str, error: Exception) -> None:
        self.lost += 1
        log.error("records: %s not written (%s: %s); %d records lost so far", what, type(error).__name__,
                  error, self.lost)
        for hook in self.on_lost:
            try:
                hook(1)
            except Exception:
                log.exception("records: an on_lost hook failed")

    @property
    def queued(self) -> int:
        """Records waiting for the writer (a database that is slow or down makes this grow)."""
        return self._queue.qsize()

    def flush(self) -> None:
        """Blocks until every queued record is written (or counted lost)."""
        self._queue.join()

    async def aflush(self) -> None:
        await asyncio.to_thread(self.flush)

    async def aclose(self) -> None:
        """Writes what is queued, then stops the writer thread (and the periodic retention)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    def close(self) -> None:
        """`aclose` for code without an event loop."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
