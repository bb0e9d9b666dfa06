"""The records schema: SQLAlchemy Core tables, one definition for SQLite and PostgreSQL.

Every time is **Unix epoch seconds as a float** (UTC by definition; the
same unit as `ApiKey.created_at` and the conversation's wall clock), so
both dialects store and compare the same numbers and no time zone is ever
involved.  Usage quantities are columns named after `agent/usage.py`
(``USAGE_QUANTITIES``), so a new quantity is a new migration.

The migration ``versions/0001_initial.py`` creates exactly these tables;
``tests/test_records.py`` checks that the migrated database and this
metadata do not differ (Alembic's ``compare_metadata``).
"""
from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

from ..usage import USAGE_QUANTITIES

metadata = MetaData()

#: API keys (agent/auth/keys.py `ApiKey`): the secret is never stored, only its hex SHA-256
api_keys = Table(
    "api_keys", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("scopes", String(200), nullable=False),            # comma-separated, sorted (keys.SCOPES)
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("record_audio", Boolean, nullable=False, default=False),
)

#: one row per call, written at its start; ``ended_at`` stays NULL until the call ends (or forever after a crash)
calls = Table(
    "calls", metadata,
    Column("id", String(64), primary_key=True),
    Column("transport", String(16), nullable=False),          # webrtc | sip | file
    Column("key_id", String(64), nullable=True, index=True),  # the API key that started it (None: auth off, SIP)
    Column("source", String(64), nullable=True),              # caller's address (IP); erased by forget
    Column("started_at", Float, nullable=False, index=True),
    Column("ended_at", Float, nullable=True),
    Column("hangup_cause", String(200), nullable=True),
    Column("record_audio", Boolean, nullable=False, default=False),
    Column("recording_path", Text, nullable=True),
    Column("forgotten_at", Float, nullable=True),             # `forget_call`: text, turns and recording erased
)

#: one row per caller turn: what was said and answered, and the latency ledger (agent/ledger.py `to_dict`)
turns = Table(
    "turns", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("call_id", String(64), nullable=False),
    Column("turn", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),            # answered | failed | discarded
    Column("transcript", Text, nullable=True),                # redacted per records.redact; NULL once purged
    Column("reply", Text, nullable=True),
    Column("ledger", JSON, nullable=True),
    Column("error", Text, nullable=True),                     # failed: the one-line error; discarded: the reason
    Column("stage", String(16), nullable=True),               # failed: stt | llm | tts | internal
    Column("purged_at", Float, nullable=True),                # retention (or forget) removed the text
    Index("ix_turns_call_turn", "call_id", "turn"),
    Index("ix_turns_at", "at"),
)

#: usage, idempotent: ``event_id`` is stable ("<call_id>/turn/<n>", "<call_id>/end", "model/<request id>"),
#: so a replayed insert is a no-op (ON CONFLICT DO NOTHING) and a consumer may read at least once
usage_events = Table(
    "usage_events", metadata,
    Column("event_id", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),               # turn | call_end | model
    Column("key_id", String(64), nullable=True),
    Column("call_id", String(64), nullable=True, index=True),
    Column("at", Float, nullable=False),
    *(Column(name, Float, nullable=False, default=0.0) for name in USAGE_QUANTITIES),
    Index("ix_usage_events_key_at", "key_id", "at"),
    Index("ix_usage_events_at", "at"),
)

#: what was done to the records themselves (erasure), by whom
audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("action", String(32), nullable=False),             # forget | purge
    Column("call_id", String(64), nullable=True, index=True),
    Column("actor", String(200), nullable=True),
    Column("detail", Text, nullable=True),
)
