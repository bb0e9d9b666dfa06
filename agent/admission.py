"""Admission of new calls: one capacity for the whole process, whatever the transport, and a queue-wait guard.

One `Admission` per process is shared by WebRTC signalling (`POST /offer`)
and the SIP user agent (INVITE): a call counts against one capacity. A
transport asks `try_admit(transport)` before it spends anything on a call and
gets a `Ticket` (a slot, held until `Ticket.release()`) or a `Refusal`
(answered HTTP 503 or SIP 503 with ``Retry-After``). Nothing is half
admitted: the slot is taken at once (a WebRTC offer being answered holds one,
as a ringing SIP call does), and every path that gives the call up releases
it (`release` is idempotent).

Refusals, in the order they are checked:

* ``draining`` — the process is shutting down (`drain()`, on SIGTERM:
  sub300/drain.py): calls in progress end politely, no new one starts,
  whatever the room;
* ``full`` — ``capacity.calls`` calls hold slots;
* ``transport_full`` — a transport's own cap (``webrtc.max_calls``,
  ``sip.max_calls``) is reached;
* ``saturated`` — the queue-wait guard: each finished turn reports the
  queue wait of its critical-path (COMMITTED) engine requests, summed over
  STT, LLM and TTS (`TurnLedger.queue_ms`, models/scheduling.py). Over a
  sliding window of the last ``window_turns`` turns no older than
  ``window_s``, once at least ``min_turns`` are in it, a p95 above
  ``max_queue_wait_ms`` means the calls in progress already lose their
  latency to contention: new calls are refused until the p95 falls back (or
  the turns that tripped it age out of the window). Calls in progress are
  never touched.

The capacity (`Capacity`) is ``admission.max_calls`` when it is a number.
With ``auto`` it is read from the capacity file that the load benchmark
writes (``scripts/bench_load.py --write-capacity``: JSON with at least
``capacity_calls``; also ``slo_ms``, ``machine``, ``date``, ``transport``),
else ``admission.capacity_calls``, else a per-device guess logged as a
WARNING that says how to measure (`GUESSED_CAPACITY`).

Pure logic: no I/O but the capacity file read by `resolve_capacity`, the
clock injected (seconds, ``time.monotonic`` by default).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Reason = Literal["draining", "full", "transport_full", "saturated"]
REASONS: tuple[Reason, ...] = ("draining", "full", "transport_full", "saturated")
#: calls per device when nothing is measured or configured. CPU: one call per core, from issue 10's measurement on
#: a 2-core CPU (2 calls at once held voice-to-voice p95 958 ms, 4 calls 3311 ms), capped at 8 because a guess
#: should err low (the engines' threads do not scale linearly with cores). CUDA: a guess, not measured.
GUESSED_CAPACITY = {"cpu": min(8, max(1, os.cpu_count() or 1)), "cuda": 16}
CAPACITY_FILE_NAME = "capacity.json"


class CapacityFileError(ValueError):
    """The capacity file exists but cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Capacity:
    """How many calls the process admits at once, and where that number comes from (for logs and /readyz)."""

    calls: int
    source: str


@dataclass(frozen=True)
class Refusal:
    """A call not admitted: ``reason`` (one of `REASONS`, a metrics label), a message for the caller and
    the log, and the Retry-After to send (whole seconds: RFC 9110 §10.2.3 delay-seconds, RFC 3261 §20.33)."""

    reason: Reason
    message: str
    retry_after_s: int


class Ticket:
    """One admitted call's slot. `release()` gives it back; a second release does nothing."""

    __slots__ = ("transport", "_admission", "released")

    def __init__(self, admission: Admission, transport: str) -> None:
        self.transport = transport
        self._admission = admission
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._give_back(self.transport)

    def __repr__(self) -> str:
        return f"Ticket({self.transport!r}{', released' if self.released else ''})"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default
    "linear" method, Hyndman & Fan type 7). ``values`` must not be empty."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Admission:
    """The process's call admission (see the module docstring). Not thread-safe: use it from the event loop.

    ``transport_caps``: transport → most calls of that transport at once.
    ``max_queue_wait_ms`` 0 turns the queue-wait guard off.
    """

    def __init__(self, capacity: Capacity, *, transport_caps: Mapping[str, int] | None = None,
                 max_queue_wait_ms: float = 0.0, window_turns: int = 20, window_s: float = 30.0,
                 min_turns: int = 5, retry_after_s: int = 5, clock: Clock = time.monotonic) -> None:
        if capacity.calls < 1:
            raise ValueError(f"capacity must be at least 1 call, got {capacity.calls} ({capacity.source})")
        if not 1 <= min_turns <= window_turns:
            raise ValueError(f"min_turns must be within 1..window_turns ({window_turns}), got {min_turns}")
        self.capacity = capacity
        self.transport_caps = dict(transport_caps or {})
        self.max_queue_wait_ms = max_queue_wait_ms
        self.window_s = window_s
        self.min_turns = min_turns
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._active: dict[str, int] = {}
        self._waits: deque[tuple[float, float]] = deque(maxlen=window_turns)   # (clock s, queue wait ms)
        self._saturated = False
        self.draining = False
        #: called with (transport, refusal) for every refused call: metrics, logs
        self.on_refusal: list[Callable[[str, Refusal], None]] = []

    @classmethod
    def from_config(cls, config: Config, device: str = "cpu", *, clock: Clock = time.monotonic) -> Admission:
        """The admission that ``config`` describes (``admission`` section; ``webrtc.max_calls`` and
        ``sip.max_calls`` as per-transport caps). ``device``: "cpu" | "cuda", where the engines run (for the
        guess of ``max_calls = "auto"``). Logs where the capacity comes from."""
        a = config.admission
        capacity = resolve_capacity(config, device)
        log.info("admission: %d calls at once (%s); queue-wait guard %s", capacity.calls, capacity.source,
                 f"p95 <= {a.max_queue_wait_ms:g} ms over the last {a.window_turns} turns / {a.window_s:g} s"
                 if a.max_queue_wait_ms > 0 else "off")
        return cls(capacity, transport_caps={"webrtc": config.webrtc.max_calls, "sip": config.sip.max_calls},
                   max_queue_wait_ms=a.max_queue_wait_ms, window_turns=a.window_turns, window_s=a.window_s,
                   min_turns=a.min_turns, retry_after_s=a.retry_after_s, clock=clock)

    @classmethod
    def per_transport(cls, transport: str, max_calls: int, *, retry_after_s: int = 5) -> Admission:
        """A transport's own admission when it runs alone (a test, a benchmark): ``max_calls``, no guard."""
        return cls(Capacity(max_calls, f"{transport}.max_calls"), transport_caps={transport: max_calls},
                   retry_after_s=retry_after_s)

    # ------------------------------------------------------------ calls
    def try_admit(self, transport: str) -> Ticket | Refusal:
        """A slot for a new call of ``transport`` ("webrtc", "sip", ...), or why not."""
        refusal = self._refusal(transport)
        if refusal is not None:
            log.info("admission: %s call refused: %s", transport, refusal.message)
            for listener in self.on_refusal:
                listener(transport, refusal)
            return refusal
        self._active[transport] = self._active.get(transport, 0) + 1
        return Ticket(self, transport)

    def drain(self) -> None:
        """Refuse every new call from now on (reason ``draining``); calls in progress keep their slots.
        Irreversible: a process drains once, on its way out.  Idempotent."""
        if not self.draining:
            self.draining = True
            log.info("admission: draining: new calls are refused (%d in progress)", self.active_calls())

    def _refusal(self, transport: str) -> Refusal | None:
        if self.draining:
            return Refusal("draining", "draining: this server is shutting down, try again (another server)",
                           self.retry_after_s)
        total = self.active_calls()
        if total >= self.capacity.calls:
            return Refusal("full", f"busy: {total} calls in progress (capacity {self.capacity.calls}), "
                                   "try again later", self.retry_after_s)
        cap = self.transport_caps.get(transport)
        if cap is not None and self.active_calls(transport) >= cap:
            return Refusal("transport_full", f"busy: {cap} {transport} calls in progress ({transport}.max_calls), "
                                             "try again later", self.retry_after_s)
        p95 = self.saturation_p95_ms()
        if p95 is not None:
            return Refusal("saturated", f"saturated: engine queues at {p95:.0f} ms (p95 of the last "
                                        f"{len(self._waits)} turns; limit {self.max_queue_wait_ms:g} ms), "
                                        "try again later", self.retry_after_s)
        return None

    def _give_back(self, transport: str) -> None:
        count = self._active.get(transport, 0)
        if count <= 0:   # a bug in a transport: make it visible, never go negative
            log.error("admission: a %s call released a slot that was not held", transport)
            return
        self._active[transport] = count - 1

    def active_calls(self, transport: str | None = None) -> int:
        """Slots held (calls in progress and being set up), of one transport or all."""
        if transport is not None:
            return self._active.get(transport, 0)
        return sum(self._active.values())

    def remaining_calls(self) -> int:
        """New calls that would be admitted now (0 while draining or while the queue-wait guard refuses)."""
        if self.draining or self.saturation_p95_ms() is not None:
            return 0
        return max(0, self.capacity.calls - self.active_calls())

    # ------------------------------------------------------------ the queue-wait guard
    def record_turn(self, queue_ms: Mapping[str, float]) -> None:
        """A finished turn's queue waits per engine stage (ms; `TurnLedger.queue_ms`): their sum enters the
        window. A turn without any (engines that do not report) is not counted."""
        if not queue_ms:
            return
        self._waits.append((self.clock(), float(sum(queue_ms.values()))))
        self.saturation_p95_ms()   # log a change of state now, not at the next call

    def queue_wait_p95_ms(self) -> float | None:
        """p95 of the summed queue wait of the turns in the window (ms), or None when it holds none."""
        horizon = self.clock() - self.window_s
        while self._waits and self._waits[0][0] < horizon:
            self._waits.popleft()
        if not self._waits:
            return None
        return percentile([ms for _, ms in self._waits], 95)

    def saturation_p95_ms(self) -> float | None:
        """The window's p95 (ms) when it is over ``max_queue_wait_ms`` with at least ``min_turns`` turns
        (new calls are refused), else None. Logs each change of state once."""
        p95 = self.queue_wait_p95_ms() if self.max_queue_wait_ms > 0 else None
        saturated = p95 is not None and len(self._waits) >= self.min_turns and p95 > self.max_queue_wait_ms
        if saturated != self._saturated:
            self._saturated = saturated
            if saturated:
                log.warning("admission: saturated: engine queues at p95 %.0f ms over the last %d turns (limit "
                            "%g ms); refusing new calls until they recover", p95, len(self._waits),
                            self.max_queue_wait_ms)
            else:
                shown = "no recent turns" if p95 is None else f"p95 {p95:.0f} ms over {len(self._waits)} turns"
                log.info("admission: engine queues recovered (%s); admitting new calls", shown)
        return p95 if saturated else None

    # ------------------------------------------------------------ readiness
    def describe(self) -> dict[str, Any]:
        """For /readyz and /healthz: ``ready`` (a new call would be admitted), ``reason`` when not ("draining",
        "full: …", "saturated: …"), the
        capacity and its source, calls in progress (per transport), remaining, the guard's p95."""
        p95 = self.queue_wait_p95_ms()
        saturated = self.saturation_p95_ms()
        active = self.active_calls()
        reason = None
        if self.draining:
            reason = "draining"
        elif active >= self.capacity.calls:
            reason = f"full: {active} of {self.capacity.calls} calls in progress"
        elif saturated is not None:
            reason = f"saturated: engine queues at {saturated:.0f} ms (limit {self.max_queue_wait_ms:g} ms)"
        doc: dict[str, Any] = {
            "ready": reason is None,
            "capacity_calls": self.capacity.calls,
            "capacity_source": self.capacity.source,
            "active_calls": active,
            "active_by_transport": {t: n for t, n in sorted(self._active.items()) if n},
            "remaining_calls": self.remaining_calls(),
            "queue_wait_p95_ms": None if p95 is None else round(p95, 1),
            "queue_wait_limit_ms": self.max_queue_wait_ms or None,
            "window_turns": len(self._waits),
        }
        if reason is not None:
            doc["reason"] = reason
        return doc


# ------------------------------------------------------------------ capacity
def capacity_file_path(config: Config) -> Path:
    """``admission.capacity_file``, or ``<models.cache_dir>/capacity.json``."""
    name = config.admission.capacity_file
    return Path(os.path.expanduser(name)) if name else config.cache_path / CAPACITY_FILE_NAME


def read_capacity_file(path: Path) -> dict[str, Any] | None:
    """The load benchmark's capacity document, None when there is no such file, or `CapacityFileError`.

    Required: ``capacity_calls`` (an integer >= 0; 0 = not even one call held the SLO, which admits 1).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CapacityFileError(f"capacity file {path}: {error}") from None
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise CapacityFileError(f"capacity file {path} is not JSON: {error}") from None
    calls = doc.get("capacity_calls") if isinstance(doc, dict) else None
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise CapacityFileError(f"capacity file {path}: \"capacity_calls\" must be an integer >= 0, "
                                f"got {calls!r}")
    return doc


def resolve_capacity(config: Config, device: str = "cpu") -> Capacity:
    """``admission.max_calls`` as a `Capacity`; ``auto``: the capacity file, else ``capacity_calls``, else the
    `GUESSED_CAPACITY` of ``device`` (a WARNING). A capacity file that cannot be read is logged as an ERROR
    and skipped, never silently."""
    a = config.admission
    if a.max_calls != "auto":
        return Capacity(int(a.max_calls), "admission.max_calls")
    path = capacity_file_path(config)
    try:
        doc = read_capacity_file(path)
    except CapacityFileError as error:
        log.error("admission: %s; ignoring it", error)
        doc = None
    if doc is not None:
        calls = int(doc["capacity_calls"])
        machine = str(doc.get("machine", "an unnamed machine"))
        measured = (f"measured: {path}, SLO {doc.get('slo_ms', '?')} ms, {doc.get('transport', '?')} callers, "
                    f"{doc.get('date', 'undated')}, on {machine}")
        if calls < 1:
            log.warning("admission: %s says not even one call held the SLO; admitting 1 call at a time", path)
            calls = 1
        other_device = ("no GPU" in machine) if device == "cuda" else ("GPU: " in machine)
        if other_device:
            log.warning("admission: the capacity in %s was measured on another kind of machine (%s) than this "
                        "one (%s); measure here: scripts/bench_load.py --write-capacity %s", path, machine, device,
                        path)
        return Capacity(calls, measured)
    if a.capacity_calls > 0:
        return Capacity(a.capacity_calls, "admission.capacity_calls")
    calls = GUESSED_CAPACITY.get(device, GUESSED_CAPACITY["cpu"])
    log.warning("admission: max_calls = auto but no capacity was measured (no %s) or configured "
                "(admission.capacity_calls): GUESSING %d calls at once on %s. Measure it: "
                "scripts/bench_load.py --write-capacity %s", path, calls, device, path)
    return Capacity(calls, f"a guess for {device} (nothing measured)")
