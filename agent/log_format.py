"""Log lines: plain for a terminal (the default) or one JSON object per line, with the call and turn they belong to.

The call id, API key id and turn number live in context variables
(`contextvars`): `call_context(call_id, key_id)` and `turn_context(n)` set
them for a block; `bind_call` / `bind_turn` set them for the rest of the
current task (for the top of a task that is the call's own: the SIP call's
set-up task, the responder's loop).  asyncio copies the context into every
task when the task is created, so the tasks a call starts inside its
context (the WebRTC reader, the conversation's transcriptions and replies)
log with its ids without being told.  `ContextFilter` puts them on every
record; the JSON formatter writes them when known.

JSON (python-json-logger), one object per line::

    {"time": "2026-11-30T04:12:03.418Z", "level": "INFO", "logger": "sub300.agent.responder",
     "message": "turn 2 answered", "call_id": "4f1c…", "turn": 2, "key_id": "k_3b9e…"}

``exc_info`` carries a traceback when there is one; fields a caller passes
with ``extra=`` are kept.  The records' redaction filter
(`sub300.agent.records.redaction.RedactingFilter`, ``[records].redact``:
card, phone, e-mail) runs on the handler after the context filter, so
both formats are masked alike.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter

CALL_ID: ContextVar[str | None] = ContextVar("sub300_call_id", default=None)
KEY_ID: ContextVar[str | None] = ContextVar("sub300_key_id", default=None)
TURN: ContextVar[int | None] = ContextVar("sub300_turn", default=None)

#: the plain format: as `logging.basicConfig` had it before JSON logs existed
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: context fields, in the order the JSON object shows them
CONTEXT_FIELDS = ("call_id", "turn", "key_id")
#: marks the handler `configure_logging` installed (a second call replaces it, never stacks)
_OURS = "_sub300_handler"

log = logging.getLogger(__name__)


@contextmanager
def call_context(call_id: str | None, key_id: str | None = None) -> Iterator[None]:
    """Log lines (and tasks created) inside the block carry ``call_id`` and ``key_id``; restored after it."""
    call_token, key_token = CALL_ID.set(call_id), KEY_ID.set(key_id)
    try:
        yield
    finally:
        KEY_ID.reset(key_token)
        CALL_ID.reset(call_token)


@contextmanager
def turn_context(turn: int | None) -> Iterator[None]:
    """Log lines (and tasks created) inside the block carry the turn number (from 1, per call)."""
    token = TURN.set(turn)
    try:
        yield
    finally:
        TURN.reset(token)


def bind_call(call_id: str | None, key_id: str | None = None) -> None:
    """Set the call for the rest of the current context: only at the top of a task the call owns."""
    CALL_ID.set(call_id)
    KEY_ID.set(key_id)
    TURN.set(None)


def bind_turn(turn: int | None) -> None:
    """Set the turn for the rest of the current context: only in a task that works for one call."""
    TURN.set(turn)


class ContextFilter(logging.Filter):
    """Adds ``call_id``, ``turn`` and ``key_id`` from the context to each record (None when unknown);
    a value given with ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("call_id", CALL_ID), ("turn", TURN), ("key_id", KEY_ID)):
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonLogFormatter(JsonFormatter):
    """One JSON object per record: time (UTC, ISO 8601, ms), level, logger, message, then the
    context fields that are known, ``exc_info`` / ``stack_info``, and any ``extra=`` fields."""

    def __init__(self) -> None:
        super().__init__(fmt=["message"], json_ensure_ascii=False)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds") \
            .replace("+00:00", "Z")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)
        for name in CONTEXT_FIELDS:
            value = log_data.pop(name, None)
            if value is not None:
                log_data[name] = value


def configure_logging(level: str | int = "INFO", fmt: Literal["plain", "json"] = "plain",
                      redact_kinds: Sequence[str] = (), stream: IO[str] | None = None) -> logging.Handler:
    """Install the process's log handler on the root logger (stderr unless ``stream``); returns it.

    ``fmt``: "plain" (`PLAIN_FORMAT`) or "json" (`JsonLogFormatter`).
    ``redact_kinds``: card | phone | email, masked by the records'
    `RedactingFilter` (a warning says so when that module is missing: the
    logs are then not redacted).  Calling it again replaces the handler it
    installed before.  Raises ValueError for an unknown format or level.
    """
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format must be plain or json, not {fmt!r}")
    if isinstance(level, str) and not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OURS, True)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT))
    missing_redaction = False
    if redact_kinds:
        try:
            from .records.redaction import RedactingFilter
        except ImportError:
            missing_redaction = True
        else:
            handler.addFilter(RedactingFilter(list(redact_kinds)))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if missing_redaction:
        log.warning("logs are not redacted: sub300.agent.records.redaction is not available (redact = %s)",
                    ", ".join(redact_kinds))
    return handler
