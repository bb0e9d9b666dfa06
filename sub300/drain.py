"""The drain: what `sub300 serve` does between SIGTERM and its exit.

    1st SIGTERM/SIGINT ─▶ admission.drain(): /readyz 503 "draining", new calls 503 + Retry-After
                       ─▶ every call: end politely (current turn, the goodbye, hang up)
                       ─▶ wait until no call is left, at most server.drain_timeout_s
    2nd signal, or the timeout (0: at once) ─▶ the calls left are ended now
                       ─▶ the closers, in order (SIP, web app + engines, records, traces)
                       ─▶ exit status: 0; 1 when a closer failed or did not finish

A forced stop (second signal, timeout) still exits 0: the operator asked for
it, the calls left were ended (BYE, peer connection closed) and every closer
ran, so every record was written; the log says how many calls were cut.  Exit
1 means a closer raised or overran `CLOSE_TIMEOUT_S` (records may be lost):
a service manager sees the failure.

Signals are taken with `loop.add_signal_handler` (not aiohttp's
``handle_signals``, which raises `GracefulExit` out of the event loop: the
shutdown then runs inside `asyncio.run`'s cancellation of *every* task, where
aiortc's own tasks are cancelled under a peer connection that is still
closing — the hang this module replaces, see `serve` in sub300/cli.py).
Here the drain runs as ordinary code on a live loop, and the loop ends only
when the drain returns.

One idea: the sequence.  What a transport does to end its calls lives in the
transport (`CallSet`); what a closer does lives in its owner.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, Protocol

log = logging.getLogger(__name__)

#: how often (s) the drain counts the calls left (a call ends within a playout frame or two of its BYE)
POLL_S = 0.1
#: the longest (s) one closer, or ending one transport's calls at once, may take before the exit says failure
CLOSE_TIMEOUT_S = 10.0
Outcome = Literal["drained", "timeout", "forced"]


class Drainable(Protocol):
    """What the drain needs of the process's admission (agent/admission.py `Admission`)."""

    def drain(self) -> None: ...


class CallSet(Protocol):
    """One transport's calls, as the drain sees them."""

    name: str

    def active_calls(self) -> int:
        """Calls in progress (set-up included)."""

    def end_politely(self, goodbye: str) -> None:
        """Let each call finish its turn, say ``goodbye`` and hang up (returns at once)."""

    async def end_now(self, reason: str) -> None:
        """End every call left at once and wait until they are closed."""


class Drain:
    """The drain sequence of one process (see the module docstring).

    ``admission``: refuses new calls once draining; ``calls``: the transports'
    call sets; ``closers``: ``(name, async function)`` run in order after the
    calls, each bounded by ``close_timeout_s`` (add to it while starting up:
    a closer is added once its resource exists).
    """

    def __init__(self, admission: Drainable, *, timeout_s: float, goodbye: str,
                 close_timeout_s: float = CLOSE_TIMEOUT_S, poll_s: float = POLL_S) -> None:
        self.admission = admission
        self.timeout_s = timeout_s
        self.goodbye = goodbye
        self.close_timeout_s = close_timeout_s
        self.poll_s = poll_s
        self.calls: list[CallSet] = []
        self.closers: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        #: called when the drain starts (readiness is already false): e.g. sd_notify STOPPING=1
        self.on_drain: list[Callable[[], object]] = []
        self.signals = 0
        self.outcome: Outcome | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()

    # ------------------------------------------------------------ signals
    def install(self, loop: asyncio.AbstractEventLoop,
                signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Take ``signals`` on ``loop``: the first starts the drain, the next one forces it."""
        for signum in signals:
            loop.add_signal_handler(signum, self.signal, signum)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """A stop request (a signal handler, or a test): the first drains, later ones force."""
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.warning("%s: draining (no new calls; calls in progress end after their turn, within %g s); "
                        "send it again to end them at once", name, self.timeout_s)
            self._stop.set()
        else:
            log.warning("%s again: ending the calls left at once", name)
            self._force.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait(self) -> None:
        """Return at the first stop request."""
        await self._stop.wait()

    # ------------------------------------------------------------ the sequence
    async def run(self) -> int:
        """Wait for the first stop request, drain, close; the exit status."""
        await self.wait()
        await self.drain()
        return await self.close()

    def active_calls(self) -> int:
        return sum(calls.active_calls() for calls in self.calls)

    async def drain(self) -> Outcome:
        """Refuse new calls, end the calls politely, wait (bounded), end the rest at once."""
        self.admission.drain()
        for hook in self.on_drain:
            try:
                hook()
            except Exception:
                log.exception("drain: a start hook failed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        active = self.active_calls()
        if active and self.timeout_s > 0 and not self._force.is_set():
            log.info("drain: ending %d call(s) politely", active)
            for calls in self.calls:
                calls.end_politely(self.goodbye)
        while (active := self.active_calls()) and not self._force.is_set() and (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._force.wait(), min(self.poll_s, left))
            except TimeoutError:
                pass
        outcome: Outcome = "drained" if not active else "forced" if self._force.is_set() else "timeout"
        if active:
            log.warning("drain: %s; ending %d call(s) at once", "forced" if outcome == "forced" else
                        f"the drain timeout ({self.timeout_s:g} s) is over", active)
            for calls in self.calls:
                if calls.active_calls():
                    await self._bounded(f"ending the {calls.name} calls", calls.end_now(f"drain {outcome}"))
        else:
            log.info("drain: no call left")
        self.outcome = outcome
        return outcome

    async def close(self) -> int:
        """Run every closer in order (a failure is logged and does not stop the next); 0, or 1 on a failure."""
        failed = 0
        for name, closer in self.closers:
            if not await self._bounded(f"closing {name}", closer()):
                failed += 1
        if failed:
            log.error("shutdown: %d closer(s) failed; exit status 1", failed)
            return 1
        log.info("shutdown complete (%s)", self.outcome or "not drained")
        return 0

    async def _bounded(self, what: str, work: Awaitable[object]) -> bool:
        try:
            await asyncio.wait_for(work, self.close_timeout_s)
            return True
        except TimeoutError:
            log.error("shutdown: %s did not finish within %g s", what, self.close_timeout_s)
        except Exception:
            log.exception("shutdown: %s failed", what)
        return False


# ------------------------------------------------------------------ the transports' calls
class WebRtcCalls:
    """The browser calls of web/signalling.py's `Signalling` as a `CallSet`."""

    name = "WebRTC"

    def __init__(self, signalling) -> None:   # web.signalling.Signalling (not imported: no aiortc for tests)
        self.signalling = signalling

    def active_calls(self) -> int:
        return len(self.signalling.calls)

    def end_politely(self, goodbye: str) -> None:
        for call in list(self.signalling.calls.values()):
            call.end_politely(goodbye)   # media/webrtc/call.py

    async def end_now(self, reason: str) -> None:
        await self.signalling.close_all(reason)


class SipCalls:
    """The phone calls of media/sip/service.py's `SipService` as a `CallSet`."""

    name = "SIP"

    def __init__(self, service) -> None:
        self.service = service

    def active_calls(self) -> int:
        return int(self.service.active_calls)

    def end_politely(self, goodbye: str) -> None:
        self.service.end_calls_politely(goodbye)

    async def end_now(self, reason: str) -> None:
        await self.service.end_calls(reason)
