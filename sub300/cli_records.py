"""`sub300 usage | export | forget | records purge | db upgrade`: the records database from the command line.

Each command opens the store of the configuration (``[records]``,
``SUB300_RECORDS_URL``), which migrates it to the current schema first;
``sub300 db upgrade`` does only that (a fleet runs it once before a rollout).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from sub300.agent.config import Config
from sub300.agent.records.times import RELATIVE, parse_time
from sub300.agent.usage import USAGE_QUANTITIES


def format_table(rows: list[dict[str, Any]]) -> str:
    """Usage rows as an aligned text table (one line per key and period)."""
    header = ["period", "key_id", "calls", "requests", *USAGE_QUANTITIES]
    body = [[str(row.get("period") or "all"), str(row.get("key_id") or "-"),
             *(str(row[name]) for name in header[2:])] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for r in body:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if not body:
        lines.append("(no usage in this range)")
    return "\n".join(lines)


def _store(config: Config):
    from sub300.agent.records import open_store

    return open_store(config)


def cmd_usage(args: argparse.Namespace, config: Config) -> int:
    since, until = parse_time(args.since), parse_time(args.until)
    store = _store(config)
    try:
        rows = store.usage(since, until, args.period, args.key)
    finally:
        store.close()
    if args.json:   # the document of GET /v1/usage
        print(json.dumps({"since": since, "until": until, "period": args.period, "key_id": args.key,
                          "usage": rows}, indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    from sub300.agent.records import UnknownCall

    store = _store(config)
    try:
        doc = store.export_call(args.call_id)
    except UnknownCall as error:
        print(f"sub300: {error.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(doc, indent=2))
    return 0


def cmd_forget(args: argparse.Namespace, config: Config) -> int:
    from sub300.agent.records import UnknownCall

    store = _store(config)
    try:
        result = store.forget_call(args.call_id, actor=args.actor or os.environ.get("USER") or "cli")
    except UnknownCall as error:
        print(f"sub300: {error.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"call {args.call_id} forgotten: {result['detail']} (usage quantities kept; audit log written)")
    return 0


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    if args.older_than_days is None:
        days = config.records.retention_days
        if days <= 0:
            print("records.retention_days is 0 (keep forever): nothing purged", file=sys.stderr)
            return 0
    elif args.older_than_days < 0:
        print(f"sub300 records purge: --older-than-days {args.older_than_days:g} is not allowed: expected 0 "
              "(everything up to now) or more", file=sys.stderr)
        return 2
    else:
        days = args.older_than_days
    store = _store(config)
    try:
        counts = store.purge(time.time() - days * 86_400.0)
    finally:
        store.close()
    print(f"removed the text of {counts['turns']} turns and {counts['recordings']} recordings "
          f"older than {days:g} days (usage kept)")
    return 0


def cmd_db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from sub300.agent.records.store import make_engine, resolve_url, upgrade

    engine = make_engine(resolve_url(config.records.url))
    try:
        revision = upgrade(engine)
    finally:
        engine.dispose()
    print(f"{engine.url.render_as_string(hide_password=True)}: schema at revision {revision}")
    return 0


def register(subparsers) -> None:
    usage = subparsers.add_parser("usage", help="usage totals per API key and period (records database)")
    usage.add_argument("--since", help="-7d, -12h, an ISO 8601 date/time (UTC unless an offset is given), "
                                       "or epoch seconds (default: all)")
    usage.add_argument("--until", help="same forms; exclusive (default: now and later)")
    usage.add_argument("--period", choices=("day", "month"), help="one row per key and UTC day or month")
    usage.add_argument("--key", help="one API key's usage only (its id)")
    usage.add_argument("--json", action="store_true", help="JSON (the same document as GET /v1/usage)")
    usage.set_defaults(run=cmd_usage)
    # `--since -7d`: argparse takes a word that starts with "-" for an option unless it looks like a negative
    # number; this parser has no option that looks like one, so its matcher may also accept -7d, -12h, -30m
    usage._negative_number_matcher = RELATIVE
    export = subparsers.add_parser("export", help="everything kept about a call, as JSON")
    export.add_argument("call_id")
    export.set_defaults(run=cmd_export)
    forget = subparsers.add_parser("forget", help="erase a call's transcripts, turns and recording (audited)")
    forget.add_argument("call_id")
    forget.add_argument("--actor", default=None, help="who asks (written to the audit log; default: $USER)")
    forget.set_defaults(run=cmd_forget)
    records = subparsers.add_parser("records", help="records maintenance")
    records_sub = records.add_subparsers(dest="records_command", required=True)
    purge = records_sub.add_parser("purge", help="apply retention now: remove transcripts and recordings "
                                                 "older than records.retention_days")
    purge.add_argument("--older-than-days", type=float, help="instead of records.retention_days")
    purge.set_defaults(run=cmd_purge)
    db = subparsers.add_parser("db", help="records database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="migrate the records database to the current schema (Alembic)").set_defaults(
        run=cmd_db_upgrade)


class ServeRecords:
    """What `sub300 serve` holds of the records: the store, the observer, and the call observer to hand to
    transports (metrics + records together)."""

    def __init__(self, store, observer, call_observer) -> None:
        self.store = store
        self.observer = observer
        self.call_observer = call_observer

    async def aclose(self) -> None:
        """Writes every queued record, stops the writer, closes the database (after the transports closed)."""
        import asyncio

        await self.observer.aclose()
        await asyncio.to_thread(self.store.close)


async def start_records(config: Config, app, metrics_observer, store=None) -> ServeRecords | None:
    """For `serve()`: opens (and migrates) the store off the loop, makes the `RecordsObserver`, and wires
    it into ``app`` (built by web.server.build_app, not yet started): WebRTC calls report to metrics and
    records, the admin routes (/v1/usage, /v1/calls/{id}) and the OpenAI API's usage sink. Returns None
    when ``records.enabled`` is false. Pass ``.call_observer`` to SIP; ``await .aclose()`` at the end.
    ``store``: one already opened (e.g. for the API keys of web/auth.py), shared; closed by ``aclose``."""
    if not config.records.enabled:
        return None
    import asyncio

    from sub300.agent.calls import ObserverGroup
    from sub300.agent.records import RecordsObserver, open_store
    from sub300.web import openai_api
    from sub300.web.admin import add_admin_routes
    from sub300.web.server import SIGNALLING_KEY

    if store is None:
        store = await asyncio.to_thread(open_store, config)
    observer = RecordsObserver(store, config)
    registry = getattr(metrics_observer, "registry", None)
    if registry is not None:   # the writer's health on /metrics
        from prometheus_client import Counter, Gauge

        lost = Counter("sub300_records_lost", "Records (calls, turns, usage events) the database did not take: "
                       "logged, the call went on", registry=registry)
        observer.on_lost.append(lost.inc)
        Gauge("sub300_records_queued", "Records waiting for the writer thread", registry=registry).set_function(
            lambda: observer.queued)
    call_observer = ObserverGroup([metrics_observer, observer])
    app[SIGNALLING_KEY].observer = call_observer
    add_admin_routes(app, store)
    usage_key = getattr(openai_api, "MODEL_USAGE_KEY", None)   # USAGE's sink key (web/openai_api.py)
    if usage_key is not None:
        app[usage_key] = observer
    return ServeRecords(store, observer, call_observer)
