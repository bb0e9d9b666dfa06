"""The records store: calls, turns, usage events, API keys and the audit log in one SQL database.

One code path (SQLAlchemy 2 Core) for the embedded default, SQLite, and for
fleets, PostgreSQL (``postgresql+psycopg://…``).  Every method is blocking and
commits its own transaction; `RecordsObserver` calls them from its one
writer thread, the admin routes through ``asyncio.to_thread``.  Times are
Unix epoch seconds (float), as in `schema.py`.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (SQLite's documented
pairing, https://www.sqlite.org/pragma.html#pragma_synchronous): a committed
transaction survives the process being killed (``kill -9``: the WAL is in the
OS page cache, and the next open replays it); only a power loss or OS crash
can roll back the last transactions.  ``synchronous=FULL`` would close that
too at one fsync per commit.

The schema is migrated by Alembic (``migrations/``) at `open_store`
(upgrade to head, under a PostgreSQL advisory lock so concurrent starts do
not race); a fleet runs ``sub300 db upgrade`` once before rolling out.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, String, case, create_engine, delete, event, func, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from ..auth.keys import ApiKey
from ..usage import USAGE_QUANTITIES
from .schema import api_keys, audit_log, calls, turns, usage_events

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
OUTCOMES = ("answered", "failed", "discarded")
PERIODS = ("day", "month")
#: PostgreSQL advisory lock key taken while migrating (any constant; "sub300" in ASCII)
_MIGRATION_LOCK = 0x737562333030


class UnknownCall(LookupError):
    """No call with this id is in the records."""


def state_dir() -> Path:
    """``$XDG_STATE_HOME/sub300`` or ``~/.local/state/sub300`` (XDG Base Directory Specification)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sub300"


def resolve_url(url: str) -> str:
    """``records.url``; '' → ``sqlite:///<state dir>/records.db`` (the folder is created)."""
    if url:
        return url
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'records.db'}"


def resolve_recordings_dir(recordings_dir: str, url: str) -> Path:
    """``records.recordings_dir``; '' → beside the SQLite file, or ``<state dir>/recordings``."""
    if recordings_dir:
        return Path(recordings_dir).expanduser()
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):]).parent / "recordings"
    return state_dir() / "recordings"


def make_engine(url: str) -> Engine:
    """An SQLAlchemy engine; SQLite files get WAL, ``synchronous=NORMAL`` and a 5 s busy timeout."""
    engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
    elif engine.dialect.name != "postgresql":
        raise ValueError(f"records.url: {engine.dialect.name} is not supported (sqlite or postgresql)")
    return engine


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Runs the Alembic migrations up to ``revision``; returns the database's revision after."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:   # its INFO lines (plugins, "Context impl") say nothing to an operator
        alembic_log.setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from alembic.runtime.migration import MigrationContext

    cfg = AlembicConfig(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
        return MigrationContext.configure(connection).get_current_revision()


def _insert_ignoring_duplicates(dialect: str, table, values: Mapping[str, Any]):
    """INSERT … ON CONFLICT DO NOTHING on either dialect (a replayed record is a no-op)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).values(**values).on_conflict_do_nothing()


def _period(dialect: str, period: str | None, column):
    """The UTC calendar day ("2026-11-30") or month ("2026-11") of an epoch-seconds column."""
    if period is None:
        return None
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)} (or None), not {period!r}")
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", func.to_timestamp(column)), "YYYY-MM-DD" if period == "day"
                            else "YYYY-MM")
    return func.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", column, "unixepoch")


def _quantity(name: str, amount: float | None) -> float | int:
    """Seconds as floats (ms precision), tokens and characters as integers."""
    amount = float(amount or 0.0)
    return round(amount, 3) if name.endswith("_s") else int(round(amount))


class RecordStore:
    """Calls, turns, usage and keys (implements agent/auth/keys.py `KeyStore`). Blocking; thread-safe."""

    def __init__(self, engine: Engine, recordings_dir: Path | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.recordings_dir = recordings_dir

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ KeyStore
    def add_key(self, key: ApiKey) -> None:
        with self.engine.begin() as c:
            c.execute(api_keys.insert().values(
                id=key.id, name=key.name, scopes=",".join(sorted(key.scopes)), secret_hash=key.secret_hash,
                created_at=key.created_at, revoked_at=key.revoked_at, record_audio=key.record_audio))

    def key_by_id(self, key_id: str) -> ApiKey | None:
        return self._one_key(api_keys.c.id == key_id)

    def key_by_hash(self, secret_hash: str) -> ApiKey | None:
        return self._one_key(api_keys.c.secret_hash == secret_hash)

    def revoke_key(self, key_id: str, at: float) -> bool:
        with self.engine.begin() as c:
            result = c.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                               .values(revoked_at=at))
            return result.rowcount == 1

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as c:
            return [_key(row) for row in c.execute(select(api_keys).order_by(api_keys.c.created_at))]

    def _one_key(self, where) -> ApiKey | None:
        with self.engine.connect() as c:
            row = c.execute(select(api_keys).where(where)).first()
        return None if row is None else _key(row)

    # ------------------------------------------------------------ writes of a call
    def call_started(self, call_id: str, transport: str, at: float, key_id: str | None = None,
                     source: str | None = None, record_audio: bool = False) -> None:
        """The call's row (once: a replay is ignored)."""
        with self.engine.begin() as c:
            c.execute(_insert_ignoring_duplicates(self.dialect, calls, {
                "id": call_id, "transport": transport, "key_id": key_id, "source": source, "started_at": at,
                "record_audio": record_audio}))

    def call_ended(self, call_id: str, at: float, cause: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(calls).where(calls.c.id == call_id).values(ended_at=at, hangup_cause=cause[:200]))

    def update_ledger(self, call_id: str, turn: int, ledger: Mapping[str, Any]) -> None:
        """The turn's ledger once the caller reported hearing it (transport parts, mouth-to-ear)."""
        with self.engine.begin() as c:
            c.execute(update(turns).where(turns.c.call_id == call_id, turns.c.turn == turn,
                                          turns.c.purged_at.is_(None)).values(ledger=dict(ledger)))

    def set_recording(self, call_id: str, path: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(calls).where(calls.c.id == call_id).values(recording_path=path))

    def add_turn(self, call_id: str, turn: int, at: float, outcome: str, transcript: str | None = None,
                 reply: str | None = None, ledger: Mapping[str, Any] | None = None, error: str | None = None,
                 stage: str | None = None, usage: Mapping[str, float] | None = None,
                 key_id: str | None = None) -> None:
        """One turn and its usage event (``<call_id>/turn/<n>``) in one transaction: both or neither."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        with self.engine.begin() as c:
            c.execute(turns.insert().values(call_id=call_id, turn=turn, at=at, outcome=outcome,
                                            transcript=transcript, reply=reply,
                                            ledger=dict(ledger) if ledger is not None else None,
                                            error=error, stage=stage))
            if usage:
                c.execute(self._usage_insert(f"{call_id}/turn/{turn}", "turn", key_id, call_id, at, usage))

    def add_usage(self, event_id: str, kind: str, at: float, usage: Mapping[str, float],
                  key_id: str | None = None, call_id: str | None = None) -> bool:
        """One usage event; False when ``event_id`` was already recorded (nothing is counted twice)."""
        with self.engine.begin() as c:   # RETURNING, not rowcount: psycopg's rowcount of an upsert is not 1
            insert = self._usage_insert(event_id, kind, key_id, call_id, at, usage)
            return c.execute(insert.returning(usage_events.c.event_id)).first() is not None

    def _usage_insert(self, event_id: str, kind: str, key_id: str | None, call_id: str | None, at: float,
                      usage: Mapping[str, float]):
        unknown = set(usage) - set(USAGE_QUANTITIES)
        if unknown:
            raise KeyError(f"unknown usage quantities {sorted(unknown)}")
        values: dict[str, Any] = {"event_id": event_id, "kind": kind, "key_id": key_id, "call_id": call_id,
                                  "at": at}
        values.update({name: float(usage.get(name, 0.0)) for name in USAGE_QUANTITIES})
        return _insert_ignoring_duplicates(self.dialect, usage_events, values)

    # ------------------------------------------------------------ reports
    def usage(self, since: float | None = None, until: float | None = None,
              period: str | None = None, key_id: str | None = None) -> list[dict[str, Any]]:
        """Totals per API key (and per UTC day or month): every quantity, ``calls`` (distinct calls),
        ``requests`` (model requests of /v1/*) and ``events``; JSON-able, sorted by period then key.
        ``since`` inclusive, ``until`` exclusive (epoch seconds; None = unbounded); ``key_id``: that key's
        rows only (None = every key)."""
        period_col = _period(self.dialect, period, usage_events.c.at)
        group = [usage_events.c.key_id] + ([period_col] if period_col is not None else [])
        columns = [usage_events.c.key_id,
                   (period_col if period_col is not None else literal(None, String)).label("period"),
                   func.count(func.distinct(usage_events.c.call_id)).label("calls"),
                   func.sum(case((usage_events.c.kind == "model", 1), else_=0)).label("requests"),
                   func.count().label("events"),
                   *(func.sum(usage_events.c[name]).label(name) for name in USAGE_QUANTITIES)]
        query = select(*columns).group_by(*group)
        if since is not None:
            query = query.where(usage_events.c.at >= since)
        if until is not None:
            query = query.where(usage_events.c.at < until)
        if key_id is not None:
            query = query.where(usage_events.c.key_id == key_id)
        with self.engine.connect() as c:
            rows = list(c.execute(query))
        out = [{"key_id": row.key_id, "period": row.period, "calls": int(row.calls),
                "requests": int(row.requests or 0), "events": int(row.events),
                **{name: _quantity(name, getattr(row, name)) for name in USAGE_QUANTITIES}} for row in rows]
        out.sort(key=lambda r: (r["period"] or "", r["key_id"] or ""))
        return out

    def export_call(self, call_id: str) -> dict[str, Any]:
        """Everything kept about one call: the call, its turns, its usage events, its recording's path and
        what was done to it (audit). Raises `UnknownCall`."""
        with self.engine.connect() as c:
            call = c.execute(select(calls).where(calls.c.id == call_id)).first()
            if call is None:
                raise UnknownCall(f"no call {call_id!r} in the records")
            turn_rows = c.execute(select(turns).where(turns.c.call_id == call_id)
                                  .order_by(turns.c.turn, turns.c.id)).mappings().all()
            usage_rows = c.execute(select(usage_events).where(usage_events.c.call_id == call_id)
                                   .order_by(usage_events.c.at, usage_events.c.event_id)).mappings().all()
            audit_rows = c.execute(select(audit_log).where(audit_log.c.call_id == call_id)
                                   .order_by(audit_log.c.id)).mappings().all()
        return {
            "call": dict(call._mapping),
            "turns": [{k: v for k, v in row.items() if k not in ("id", "call_id")} for row in turn_rows],
            "usage": [{k: (_quantity(k, v) if k in USAGE_QUANTITIES else v) for k, v in row.items()}
                      for row in usage_rows],
            "recording": call.recording_path,
            "audit": [{k: v for k, v in row.items() if k != "id"} for row in audit_rows],
        }

    # ------------------------------------------------------------ erasure and retention
    def forget_call(self, call_id: str, actor: str | None = None, at: float | None = None) -> dict[str, Any]:
        """Erases a call's personal data: its turns (transcripts, replies, ledgers), the caller's address and
        the recording. Kept: the call row's transport, key, times and cause, and its usage events (quantities
        only, no text) for billing. Writes an ``audit_log`` row ("forget") each time; a second erasure
        finds nothing left and says so. Raises `UnknownCall`."""
        at = time.time() if at is None else at
        with self.engine.begin() as c:
            call = c.execute(select(calls).where(calls.c.id == call_id)).first()
            if call is None:
                raise UnknownCall(f"no call {call_id!r} in the records")
            erased = c.execute(delete(turns).where(turns.c.call_id == call_id)).rowcount
            c.execute(update(calls).where(calls.c.id == call_id).values(
                source=None, recording_path=None, forgotten_at=func.coalesce(calls.c.forgotten_at, at)))
            recording = call.recording_path
            deleted = _delete_file(recording)
            detail = f"{erased} turns erased" + (f", recording {'deleted' if deleted else 'missing'}"
                                                 if recording else "") + ("" if call.forgotten_at is None
                                                                          else " (already forgotten)")
            c.execute(audit_log.insert().values(at=at, action="forget", call_id=call_id, actor=actor,
                                                detail=detail))
        log.info("call %s forgotten by %s: %s", call_id, actor or "(unknown)", detail)
        return {"call_id": call_id, "turns_erased": erased, "recording_deleted": deleted, "at": at,
                "actor": actor, "detail": detail}

    def purge(self, older_than: float, at: float | None = None) -> dict[str, int]:
        """Retention: removes the text of turns older than ``older_than`` (epoch s: transcript, reply,
        ledger, error) and the recordings of calls started before it; usage events stay. One audit row
        ("purge") when anything was removed. Returns the counts."""
        at = time.time() if at is None else at
        with self.engine.begin() as c:
            purged = c.execute(update(turns).where(turns.c.at < older_than, turns.c.purged_at.is_(None)).values(
                transcript=None, reply=None, ledger=None, error=None, purged_at=at)).rowcount
            old = c.execute(select(calls.c.id, calls.c.recording_path).where(
                calls.c.started_at < older_than, calls.c.recording_path.is_not(None))).all()
            for row in old:
                _delete_file(row.recording_path)
            if old:
                c.execute(update(calls).where(calls.c.id.in_([row.id for row in old])).values(recording_path=None))
            if purged or old:
                c.execute(audit_log.insert().values(
                    at=at, action="purge", call_id=None, actor="retention",
                    detail=f"{purged} turns and {len(old)} recordings older than {older_than:.0f}"))
        return {"turns": purged, "recordings": len(old)}

    def audit(self, call_id: str | None = None) -> list[dict[str, Any]]:
        query = select(audit_log).order_by(audit_log.c.id)
        if call_id is not None:
            query = query.where(audit_log.c.call_id == call_id)
        with self.engine.connect() as c:
            return [{k: v for k, v in row.items() if k != "id"} for row in c.execute(query).mappings()]


def _key(row) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, scopes=frozenset(s for s in row.scopes.split(",") if s),
                  secret_hash=row.secret_hash, created_at=row.created_at, revoked_at=row.revoked_at,
                  record_audio=bool(row.record_audio))


def _delete_file(path: str | None) -> bool:
    """True when the file was there and is gone; a missing file is logged, not raised."""
    if not path:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        log.warning("recording %s was already gone", path)
        return False


def open_store(config: Any, *, migrate: bool = True) -> RecordStore:
    """The store of ``config`` (a `Config` or its `RecordsConfig`): connects, and migrates to head unless
    ``migrate`` is False. Blocking (call it before the event loop, or in a thread)."""
    records = getattr(config, "records", config)
    url = resolve_url(records.url)
    engine = make_engine(url)
    if migrate:
        revision = upgrade(engine)
        log.debug("records: %s at schema revision %s", engine.url.render_as_string(hide_password=True), revision)
    return RecordStore(engine, resolve_recordings_dir(records.recordings_dir, url))
