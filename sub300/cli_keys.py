"""`sub300 keys create | list | revoke`: API keys from the command line, in the records database.

The store is the configuration's (``[records]``, ``SUB300_RECORDS_URL``:
`sub300.agent.records.open_store`), the same one `sub300 serve` reads keys
from on every request (cached for at most 5 s: agent/auth/authenticator.py),
so a key created or revoked here works or stops on a running server within
5 s, on every node that shares the database.

``create`` prints the secret once (only its SHA-256 is stored: a lost
secret cannot be shown again; create another key and revoke the old one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from sub300.agent.auth.keys import SCOPES, ApiKey, BadScopes, new_key
from sub300.agent.config import Config

EXIT_BAD_INPUT = 2


def _store(config: Config) -> Any:
    from sub300.agent.records import open_store

    return open_store(config)


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def _when(at: float | None) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at is not None else "-"


def key_to_dict(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "scopes": sorted(key.scopes), "record_audio": key.record_audio,
            "created_at": key.created_at, "revoked_at": key.revoked_at, "active": key.active}


def cmd_create(args: argparse.Namespace, config: Config) -> int:
    try:
        key, secret = new_key(args.name, args.scopes, record_audio=args.record_audio)
    except BadScopes as error:
        print(f"sub300 keys create: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    store = _store(config)
    try:
        store.add_key(key)
    finally:
        _close(store)
    if args.json:
        print(json.dumps({**key_to_dict(key), "secret": secret}))
    else:
        print(f"id:     {key.id}\nname:   {key.name}\nscopes: {','.join(sorted(key.scopes))}"
              f"{chr(10) + 'record_audio: yes' if key.record_audio else ''}\n"
              f"secret: {secret}\n"
              "The secret is shown once; only its hash is stored.", flush=True)
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        keys = store.list_keys()
    finally:
        _close(store)
    if args.json:
        print(json.dumps({"keys": [key_to_dict(k) for k in keys]}, indent=2))
        return 0
    rows = [("id", "name", "scopes", "created", "revoked", "record_audio")]
    rows += [(k.id, k.name, ",".join(sorted(k.scopes)), _when(k.created_at), _when(k.revoked_at),
              "yes" if k.record_audio else "no") for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not keys:
        print("(no keys: sub300 keys create --name NAME --scopes calls)")
    return 0


def cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        revoked = store.revoke_key(args.id, time.time())
    finally:
        _close(store)
    if not revoked:
        print(f"sub300 keys revoke: no active key {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.id} (a running server stops accepting it, and its call tokens, within 5 s)")
    return 0


def register(subparsers: Any) -> None:
    """`sub300 keys …` on the main parser's sub-commands."""
    keys = subparsers.add_parser("keys", help="API keys: create, list, revoke (in the records database)")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--name", required=True, help="who the key is for (shown in lists and usage)")
    create.add_argument("--scopes", default="calls",
                        help=f"comma-separated, of {', '.join(SCOPES)} (default: calls)")
    create.add_argument("--record-audio", action="store_true", help="record the audio of this key's calls")
    create.add_argument("--json", action="store_true", help="one JSON object (with the secret) on stdout")
    create.set_defaults(run=cmd_create)
    listing = sub.add_parser("list", help="every key (never a secret)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_list)
    revoke = sub.add_parser("revoke", help="revoke a key (and its call tokens)")
    revoke.add_argument("id", help="the key id (from `sub300 keys list`)")
    revoke.set_defaults(run=cmd_revoke)
