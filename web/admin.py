"""Admin routes over the records store: usage for billing, export and erasure of a call.

* ``GET /v1/usage?since=&until=&period=day|month`` → the same JSON as
  ``sub300 usage --json`` (``since``/``until``: -7d, ISO 8601, epoch seconds);
* ``GET /v1/calls/{id}`` → everything kept about the call (`RecordStore.export_call`);
* ``DELETE /v1/calls/{id}`` → erases it (`RecordStore.forget_call`; the audit log names the
  actor: the API key of ``request[PRINCIPAL]``, or "admin-api" when authentication is off).

Scopes (usage; admin) are enforced by web/auth.py's middleware, not here.  Store
calls block, so they run in a worker thread.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from sub300.agent.config import ConfigError
from sub300.agent.records import RecordStore, UnknownCall
from sub300.agent.records.store import PERIODS
from sub300.agent.records.times import parse_time

from .auth import PRINCIPAL

RECORDS_KEY = web.AppKey("records", RecordStore)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def usage(request: web.Request) -> web.Response:
    period = request.query.get("period") or None
    if period is not None and period not in PERIODS:
        return _bad(f"period must be one of {', '.join(PERIODS)}")
    try:
        since, until = parse_time(request.query.get("since")), parse_time(request.query.get("until"))
    except ConfigError as error:
        return _bad(str(error))
    # a "usage" key reads its own usage (a tenant's key sees no other tenant); one that also has "admin",
    # or any caller while authentication is off, reads every key's
    principal = request.get(PRINCIPAL)
    key_id = None   # every key's
    if principal is not None and principal.via != "open" and "admin" not in principal.scopes:
        key_id = principal.key_id
    rows = await asyncio.to_thread(request.app[RECORDS_KEY].usage, since, until, period, key_id)
    return web.json_response({"since": since, "until": until, "period": period,
                              "key_id": key_id, "usage": rows})


async def export_call(request: web.Request) -> web.Response:
    try:
        doc = await asyncio.to_thread(request.app[RECORDS_KEY].export_call, request.match_info["call_id"])
    except UnknownCall as error:
        return web.json_response({"error": error.args[0]}, status=404)
    return web.json_response(doc)


async def forget_call(request: web.Request) -> web.Response:
    principal = request.get(PRINCIPAL)
    actor = getattr(principal, "key_id", None) or "admin-api"
    try:
        result = await asyncio.to_thread(request.app[RECORDS_KEY].forget_call, request.match_info["call_id"],
                                         actor)
    except UnknownCall as error:
        return web.json_response({"error": error.args[0]}, status=404)
    return web.json_response(result)


def add_admin_routes(app: web.Application, store: RecordStore) -> None:
    app[RECORDS_KEY] = store
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/calls/{call_id}", export_call)
    app.router.add_delete("/v1/calls/{call_id}", forget_call)
