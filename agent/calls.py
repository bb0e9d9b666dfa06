"""How transports report calls to whoever watches them (metrics, records, traces, logs).

A transport (WebRTC, SIP, a file) calls `call_started` when a call is set up
and feeds the returned listener to its Conversation; it calls `call_ended`
exactly once when the call is torn down, whatever the reason.  What the
transport knows of the caller (the API key that admitted it, its address)
rides along in a `CallContext`.  `ObserverGroup` fans one call out to
several observers (`sub300 serve`: metrics, records, traces).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .events import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallContext:
    """Who a call belongs to, as its transport admitted it.

    ``key_id``: the API key that started the call (its id, never its
    secret), directly or through a call token; None when authentication is
    off or the transport has no keys (SIP).  ``source``: the caller's
    network address (IP, no port).  ``record_audio``: the key or the
    configuration asked for the call's audio to be recorded.
    """

    key_id: str | None = None
    source: str | None = None
    record_audio: bool = False


class CallObserver(Protocol):
    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        """Returns the listener for this call's conversation events."""
        ...

    def call_ended(self, transport: str, call_id: str, reason: str) -> None: ...


class LoggingObserver:
    """The default observer: a log line per call."""

    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        log.info("%s call %s started", transport, call_id)
        return lambda event: None

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        log.info("%s call %s ended: %s", transport, call_id, reason)


class ObserverGroup:
    """Several observers as one: each sees every call; one that raises is logged and the others go on."""

    def __init__(self, observers: Sequence[CallObserver]) -> None:
        self.observers = list(observers)

    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        listeners = []
        for observer in self.observers:
            try:
                listeners.append(observer.call_started(transport, call_id, context))
            except Exception:
                log.exception("call observer %s failed at the start of %s call %s",
                              type(observer).__name__, transport, call_id)

        def listen(event: Event) -> None:
            for listener in listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("call observer failed on %s of %s call %s", event.kind, transport, call_id)

        return listen

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        for observer in self.observers:
            try:
                observer.call_ended(transport, call_id, reason)
            except Exception:
                log.exception("call observer %s failed at the end of %s call %s",
                              type(observer).__name__, transport, call_id)
