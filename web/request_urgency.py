"""A media node's urgency changes for the requests it has in flight on this model node (issue 13).

``X-Sub300-Urgency`` (web/server_timing.py) is the media node's ticket class
when it *sent* a request.  The class changes later: a reply started
speculatively on the early transcript becomes COMMITTED when the turn ends
(agent/reply.py), its LLM stream turns SLACK after the first clause, an early
final transcript is promoted when the caller stops talking
(agent/transcription.py).  So that this node's schedulers see the change:

* a model request (``/v1/chat/completions``, ``/v1/audio/transcriptions``,
  ``/v1/audio/speech``) may carry ``X-Sub300-Request-Id: <id>`` (16–128
  characters of ``A-Z a-z 0-9 _ -``; the media node's remote engines send
  ``secrets.token_urlsafe(16)``, 128 random bits: unguessable).  Its route
  keeps the request's `WorkTicket` here under that id (`track`) until the
  handler returns (`forget`), and answers the id back in the same header, so
  the client learns that this endpoint takes urgency changes (vLLM and other
  servers do not echo it);
* ``POST /v1/requests/{id}/urgency`` ``{"urgency": "committed"|"slack"|"speculative"}``
  (scope "model", web/auth.py) sets that ticket's urgency; the engine's
  scheduler hears of it through the ticket's listeners (models/scheduling.py)
  and serves the request in its new class from its next decision on.  Answers
  ``200 {"id", "urgency", "previous"}``; 400 for a body that is not one of the
  three; 404 for an id that is unknown, already finished, or tracked for
  another API key (the same answer, code ``not_found``, so a key cannot learn
  which ids exist) — except that the key that made a request finished in the
  last `FINISHED_KEPT_S` seconds gets code ``request_finished``: its last
  bytes may still be on their way, a change that crossed them is no failure,
  whereas ``not_found`` for a request the client still reads means the change
  went to another node than the request (a balancer between them) or was lost.

Owner: the API key that made the request (``request[PRINCIPAL].key_id``,
web/auth.py); without one (authentication off and no key given, or an app
without auth), the SHA-256 of its ``Authorization`` header (none: the empty
string), so only the same credential may change it.

Errors of `track`: a malformed id is a 400 (``invalid_request_id``), an id
already in flight a 409 (``request_id_in_use``): never a silent second entry.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from sub300.models.scheduling import Urgency, WorkTicket

from .auth import PRINCIPAL

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Sub300-Request-Id"
#: what an id may look like (RFC 4648 §5 base64url letters; token_urlsafe(16) gives 22)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_URGENCIES = {u.name.lower(): u for u in Urgency}
_ENTRY = web.RequestKey("sub300_request_id", str)
#: seconds a finished request's id is remembered (for ``request_finished``), and how many at most
FINISHED_KEPT_S = 10.0
FINISHED_KEPT_MAX = 4096
#: what `InFlightRequests.change` answers for a request its owner made that has finished
FINISHED = "finished"


class RequestIdError(ValueError):
    """A request's ``X-Sub300-Request-Id`` that cannot be tracked: ``status`` 400 (malformed) or 409 (in use)."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> web.Response:
        """The OpenAI-shaped error answer."""
        return web.json_response({"error": {"message": str(self), "type": "invalid_request_error",
                                            "param": None, "code": self.code}}, status=self.status)


@dataclass
class _Tracked:
    ticket: WorkTicket
    owner: str
    path: str


def _owner(request: web.BaseRequest) -> str:
    principal = request.get(PRINCIPAL)
    key_id = getattr(principal, "key_id", None)
    if key_id is not None:
        return f"key:{key_id}"
    credential = request.headers.get("Authorization", "")
    return "credential:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()


class InFlightRequests:
    """The model requests in flight that carry an id: id → (ticket, owner); and those finished in the last
    `FINISHED_KEPT_S` (id → owner, finish time on ``clock``).  Event-loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tracked: dict[str, _Tracked] = {}
        self._finished: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.clock = clock

    def __len__(self) -> int:
        return len(self._tracked)

    def ticket(self, request_id: str) -> WorkTicket | None:
        """The ticket tracked under ``request_id`` (tests, diagnostics); None when none."""
        tracked = self._tracked.get(request_id)
        return tracked.ticket if tracked is not None else None

    def track(self, request: web.BaseRequest, ticket: WorkTicket) -> str | None:
        """Keep ``ticket`` under ``request``'s ``X-Sub300-Request-Id`` (None: the request has none) until
        `forget`.  Raises `RequestIdError`."""
        raw = request.headers.get(REQUEST_ID_HEADER)
        if raw is None:
            return None
        request_id = raw.strip()
        if not _REQUEST_ID.match(request_id):
            raise RequestIdError(f"{REQUEST_ID_HEADER} must be 16 to 128 characters of A-Z, a-z, 0-9, _ and -",
                                 status=400, code="invalid_request_id")
        if request_id in self._tracked:
            raise RequestIdError(f"{REQUEST_ID_HEADER} {request_id[:12]}… is already in flight here; "
                                 "send a new id with each request", status=409, code="request_id_in_use")
        self._tracked[request_id] = _Tracked(ticket, _owner(request), request.path)
        request[_ENTRY] = request_id
        return request_id

    def forget(self, request: web.BaseRequest) -> None:
        """Stop tracking what ``request`` registered (idempotent; nothing when it registered nothing)."""
        request_id = request.pop(_ENTRY, None)
        if request_id is None:
            return
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            now = self.clock()
            self._finished[request_id] = (tracked.owner, now)
            while self._finished and (len(self._finished) > FINISHED_KEPT_MAX
                                      or next(iter(self._finished.values()))[1] < now - FINISHED_KEPT_S):
                self._finished.popitem(last=False)

    def change(self, request_id: str, owner: str, urgency: Urgency) -> Urgency | str | None:
        """Set the urgency of ``request_id``'s ticket when ``owner`` made it; its previous urgency, `FINISHED`
        (``owner``'s request finished in the last `FINISHED_KEPT_S`), or None (unknown, or another owner's)."""
        tracked = self._tracked.get(request_id)
        if tracked is None or not hmac.compare_digest(tracked.owner, owner):
            finished = self._finished.get(request_id)
            if (finished is not None and finished[1] >= self.clock() - FINISHED_KEPT_S
                    and hmac.compare_digest(finished[0], owner)):
                return FINISHED
            return None
        previous = tracked.ticket.urgency
        tracked.ticket.urgency = urgency
        if previous != urgency:
            log.debug("%s %s: %s -> %s", tracked.path, request_id[:8], previous.name, urgency.name)
        return previous


IN_FLIGHT_KEY = web.AppKey("in_flight_requests", InFlightRequests)


def track(request: web.Request, ticket: WorkTicket) -> None:
    """For a model route: keep ``ticket`` under the request's id on the app's `InFlightRequests` (when the app
    has one) until `forget`.  Raises `RequestIdError` (answer its `RequestIdError.response`)."""
    in_flight = request.app.get(IN_FLIGHT_KEY)
    if in_flight is not None:
        try:
            in_flight.track(request, ticket)
        except RequestIdError as exc:
            log.info("%s refused: %s", request.path, exc)
            raise


def forget(request: web.Request) -> None:
    """For a model route, when its handler returns: the request's id is no longer in flight."""
    in_flight = request.app.get(IN_FLIGHT_KEY)
    if in_flight is not None:
        in_flight.forget(request)


def echo_header(request: web.Request) -> dict[str, str]:
    """``{X-Sub300-Request-Id: id}`` for a tracked request's answer ({} when untracked)."""
    request_id = request.get(_ENTRY)
    return {REQUEST_ID_HEADER: request_id} if request_id is not None else {}


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}, status=status)


async def change_urgency(request: web.Request) -> web.Response:
    """``POST /v1/requests/{id}/urgency``: see the module docstring."""
    request_id = request.match_info["id"]
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    raw = body.get("urgency") if isinstance(body, dict) else None
    urgency = _URGENCIES.get(raw) if isinstance(raw, str) else None
    if urgency is None:
        return _error(400, f'body must be {{"urgency": "{"|".join(_URGENCIES)}"}}', "invalid_urgency")
    previous = request.app[IN_FLIGHT_KEY].change(request_id, _owner(request), urgency)
    if previous == FINISHED:
        return _error(404, "this request has finished here", "request_finished")
    if not isinstance(previous, Urgency):
        return _error(404, "no such request in flight here (unknown, finished, or another key's)", "not_found")
    return web.json_response({"id": request_id, "urgency": urgency.name.lower(),
                              "previous": previous.name.lower()})


def add_request_routes(app: web.Application) -> InFlightRequests:
    """The app's `InFlightRequests` and ``POST /v1/requests/{id}/urgency``; returns the registry."""
    in_flight = app[IN_FLIGHT_KEY] = InFlightRequests()
    app.router.add_post("/v1/requests/{id}/urgency", change_urgency)
    return in_flight


__all__ = ["FINISHED_KEPT_S", "IN_FLIGHT_KEY", "REQUEST_ID_HEADER", "InFlightRequests", "RequestIdError", "add_request_routes",
           "change_urgency", "echo_header", "forget", "track"]
