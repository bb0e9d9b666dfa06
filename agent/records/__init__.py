"""Durable records of calls, turns and usage (SQLite or PostgreSQL), their retention, redaction and erasure.

`open_store(config)` connects and migrates; `RecordsObserver(store, config)` writes what calls and
model requests leave behind; `redaction.RedactingFilter(kinds)` masks the same things in log lines.
"""
from __future__ import annotations

from .observer import RecordsObserver
from .store import RecordStore, UnknownCall, open_store

__all__ = ["RecordStore", "RecordsObserver", "UnknownCall", "open_store"]
