"""How transports report calls to whoever watches them (metrics, logs, the admin page).

A transport (WebRTC, SIP, a file) calls `call_started` when a call is set up
and feeds the returned listener to its Conversation; it calls `call_ended`
exactly once when the call is torn down, whatever the reason.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .events import Event

log = logging.getLogger(__name__)


class CallObserver(Protocol):
    def call_started(self, transport: str, call_id: str) -> Callable[[Event], None]:
        """Returns the listener for this call's conversation events."""
        ...

    def call_ended(self, transport: str, call_id: str, reason: str) -> None: ...


class LoggingObserver:
    """The default observer: a log line per call."""

    def call_started(self, transport: str, call_id: str) -> Callable[[Event], None]:
        log.info("%s call %s started", transport, call_id)
        return lambda event: None

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        log.info("%s call %s ended: %s", transport, call_id, reason)
