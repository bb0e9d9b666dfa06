"""What the remote engines share: one HTTP client per endpoint, failures, retries, Server-Timing.

The remote LLM (models/llm_openai.py), STT (models/stt_openai.py) and TTS
(models/tts_openai.py) each talk to one OpenAI-compatible endpoint (vLLM,
SGLang, llama.cpp's server, a hosted API, or another sub300 with
``server.role = "model"``) through one `RemoteEndpoint`:

* **Session.**  One aiohttp session per engine, created lazily in the running
  event loop (a new loop, as in tests, gets a new one), closed by `aclose`.
  Connecting (DNS, TCP, TLS) is bounded by ``connect_timeout_s``; the other
  waits are the engine's (first byte, idle gap, whole answer).  HTTP/1.1
  carries one request per connection, so at most ``max_connections`` requests
  are open at once; the others wait in a `PriorityLimiter` (committed work
  first, then SLACK by deadline), and that wait is the ticket's queue wait.
  Idle connections are kept `KEEPALIVE_TIMEOUT_S`, below the 5 s after which
  uvicorn-based servers close them, so a request is never sent on a
  connection the server is closing.
* **Headers.**  ``Authorization: Bearer <key>`` when a key is configured
  (read by the engine factory from the environment variable the config
  names), and ``X-Sub300-Urgency: committed|slack|speculative``, the ticket's
  urgency when the request is sent, so a sub300 model node schedules it in the
  same deadline class (absent = committed).
* **Urgency changes** (`follow`): the class changes after a request is sent
  (a reply started speculatively is committed when the turn ends).  An
  engine built with ``requests_url`` (``{base_url}/requests``) sends each
  request with ``X-Sub300-Request-Id: <secrets.token_urlsafe(16)>`` and,
  while the request is open, posts each change of its ticket's urgency to
  ``{requests_url}/{id}/urgency`` ``{"urgency": ...}`` (web/request_urgency.py
  on a sub300 model node): best-effort, in order (one sender per request,
  the latest class wins), on a small session of its own (so it never waits
  behind the ``max_connections`` streams), each post bounded by
  `URGENCY_UPDATE_TIMEOUT_S`.  A 404 before the request's first byte is
  tried again (`URGENCY_UPDATE_TRIES`: the node may not have read the
  request yet); a 404 with code ``request_finished`` (the node finished it;
  its last bytes may still be on their way) or after the request ended here
  is expected: nothing left to change.  A plain 404 after the first byte
  means the change reached another node than the request (a balancer between
  them) or was lost.  Any failure is logged and counted
  (``urgency_updates_failed``); it never fails the request, which goes on in
  its old class there.  A node that does not answer the id back in its
  response (vLLM, SGLang, a hosted API) is sent no more changes (logged
  once).  `aclose` cancels and awaits the senders.
* **Failures** become the `EndpointError` family of models/protocols.py, each
  message naming the URL: `EndpointUnreachable` (refused, DNS),
  `EndpointTimeout`, `EndpointHTTPError` (``http_4xx``/``http_5xx``, with an
  excerpt of the body), `EndpointDropped` (the connection broke before the
  answer was complete), `EndpointProtocolError` (an answer that cannot be
  parsed).
* **Retries, only where safe** (`post`): a request that failed before the
  endpoint began to answer it — the connection was refused, or the answer was
  502, 503 or 504 (a proxy or server that did not take the work) — is sent
  again, up to ``retries`` times, after ``Retry-After`` (RFC 9110 §10.2.3:
  seconds or an HTTP date) capped at `RETRY_AFTER_CAP_S`, or after
  `RETRY_BACKOFF_S` doubled per attempt when the endpoint names no delay; and
  only while the engine's deadline leaves time for it.  Nothing is retried once
  an answer has begun (its first byte came: audio may already be playing), nor
  a timeout, nor a dropped connection (the endpoint may have done the work), nor
  another status.
* **Server-Timing** (W3C Server Timing, ``name;dur=<ms>, ...``): at the first
  byte of the answer (its response headers), `mark_first_byte` fills the
  ticket's ``remote_queue_s`` with the endpoint's own queue wait
  (``queue;dur=``) and ``network_s`` with the rest of the time since the
  request was sent that was neither that queue nor the endpoint's work up to
  its first byte (``work;dur=``), clamped at 0: the network, connection set-up
  and any retries.  An endpoint that sends no Server-Timing leaves both None
  (the whole time counts as its work; nothing is guessed).  A sub300 model node
  sends both (web/, the contract in agent/ledger.py's ``network_ms``).
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from .protocols import (
    EndpointDropped,
    EndpointError,
    EndpointHTTPError,
    EndpointProtocolError,
    EndpointTimeout,
    EndpointUnreachable,
)
from .scheduling import PriorityLimiter, Urgency, WorkTicket

log = logging.getLogger(__name__)

#: seconds an idle pooled connection is kept.  Below the 5 s after which uvicorn, and so vLLM
#: (``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, default 5) and SGLang (``timeout_keep_alive=5``), close an
#: idle connection: a request is never sent on a connection the server is closing at that moment
#: (aiohttp does not retry a POST; its own default is 15 s).
KEEPALIVE_TIMEOUT_S = 4.0
#: the longest ``Retry-After`` honoured (s): a longer one is cut to this (a caller is waiting)
RETRY_AFTER_CAP_S = 2.0
#: the first retry's delay when the endpoint names none (s); doubled for each later attempt
RETRY_BACKOFF_S = 0.05
#: statuses that say the endpoint did not take the request (RFC 9110 §15.6.3-5): safe to send again
RETRYABLE_STATUSES = frozenset({502, 503, 504})
#: the request header that carries the ticket's deadline class to a sub300 model node
URGENCY_HEADER = "X-Sub300-Urgency"
#: the request header that names a request so that later urgency changes can follow it (echoed by a sub300 node)
REQUEST_ID_HEADER = "X-Sub300-Request-Id"
#: seconds one urgency change may take (connect and answer); best-effort: then it is logged and counted
URGENCY_UPDATE_TIMEOUT_S = 1.0
#: tries of an urgency change answered 404 before the request's first byte (the node may not have it yet)
URGENCY_UPDATE_TRIES = 3
#: seconds between those tries
URGENCY_UPDATE_RETRY_S = 0.02
#: connections of the small session that carries urgency changes
URGENCY_UPDATE_CONNECTIONS = 8
#: how much of an error body goes into the exception message
BODY_EXCERPT_CHARS = 300
#: seconds between two warnings that every connection is busy
_POOL_FULL_WARNING_INTERVAL_S = 10.0


# ------------------------------------------------------------------ Server-Timing
def parse_server_timing(values: str | list[str] | tuple[str, ...] | None) -> dict[str, float]:
    """``Server-Timing`` header value(s) → {metric name: duration in ms} (W3C Server Timing §3).

    ``queue;dur=12.5, work;dur=80;desc="whisper"`` → ``{"queue": 12.5, "work": 80.0}``.  Several
    header lines are one list.  A metric without a ``dur`` (or with one that is not a finite number
    >= 0) is left out; names are compared case-insensitively (lower-cased); the first of a repeated
    name wins.  Never raises: a malformed header gives what could be read.
    """
    if not values:
        return {}
    lines = [values] if isinstance(values, str) else list(values)
    found: dict[str, float] = {}
    for line in lines:
        for metric in _split_outside_quotes(line, ","):
            parts = _split_outside_quotes(metric, ";")
            name = parts[0].strip().lower() if parts else ""
            if not name or name in found:
                continue
            for param in parts[1:]:
                key, _, value = param.partition("=")
                if key.strip().lower() != "dur":
                    continue
                try:
                    ms = float(value.strip().strip('"'))
                except ValueError:
                    break
                if ms >= 0.0 and ms != float("inf"):
                    found[name] = ms
                break
    return found


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` except inside a quoted string (``desc="a, b"``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def mark_first_byte(ticket: WorkTicket, headers: Mapping[str, str] | Any, now: float | None = None) -> None:
    """At the answer's first byte: the ticket's ``remote_queue_s`` and ``network_s`` from its Server-Timing.

    ``headers``: the response's headers (a multidict: every ``Server-Timing`` line is read).
    ``now``: the moment on ``ticket.clock`` (default: read it now).  With ``queue`` and/or ``work``
    in the header: remote_queue_s = queue, network_s = (now - started) - queue - work, clamped at 0
    (a missing one of the two counts 0).  With neither, or a ticket never started: both stay None.
    """
    if ticket.started is None:
        return
    getall = getattr(headers, "getall", None)
    raw = getall("Server-Timing", []) if getall is not None else headers.get("Server-Timing")
    timing = parse_server_timing(raw)
    if "queue" not in timing and "work" not in timing:
        return
    elapsed = (ticket.clock() if now is None else now) - ticket.started
    queue_s = timing.get("queue", 0.0) / 1000.0
    work_s = timing.get("work", 0.0) / 1000.0
    ticket.remote_queue_s = queue_s
    ticket.network_s = max(0.0, elapsed - queue_s - work_s)


def urgency_header(ticket: WorkTicket | None) -> dict[str, str]:
    """``{X-Sub300-Urgency: committed|slack|speculative}`` for ``ticket`` (None: committed)."""
    urgency = ticket.urgency if ticket is not None else Urgency.COMMITTED
    return {URGENCY_HEADER: urgency.name.lower()}


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` value (delay-seconds or an HTTP date, RFC 9110 §10.2.3) → seconds >= 0;
    None when absent or unreadable.  ``now``: the wall clock (s since the epoch) for a date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ------------------------------------------------------------------ urgency changes
class Followed:
    """One open request whose urgency changes are sent to the endpoint (`RemoteEndpoint.follow`)."""

    __slots__ = ("request_id", "pending", "sender", "answered", "open")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        #: the latest class not sent yet
        self.pending: Urgency | None = None
        self.sender: asyncio.Task[None] | None = None
        #: its first byte came (the node had it then: a later 404 is not a race)
        self.answered = False
        #: the engine still reads its answer
        self.open = True


# ------------------------------------------------------------------ the client
class RemoteEndpoint:
    """One remote engine's HTTP client: its session, connection limit, headers and error messages.

    ``what`` names the engine in messages ("LLM", "STT", "TTS"); ``url`` is the full URL of the
    route it posts to.  ``headers``: sent with every request (e.g. ``Accept``).  ``requests_url``: where
    urgency changes go (``{base_url}/requests``; None: none are sent, see `follow`).  Raises
    EndpointError for a URL that is not http(s), ValueError for ``max_connections`` < 1.
    """

    def __init__(self, what: str, url: str, *, api_key: str | None = None, connect_timeout_s: float,
                 max_connections: int, headers: Mapping[str, str] | None = None,
                 requests_url: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise EndpointError(f"{what} base_url must start with http:// or https://, got {url!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        self.what = what
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._api_key = api_key
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self.connections = PriorityLimiter(max_connections, name=f"{what.lower()} connections")
        self._pool_full_warned_at: float | None = None
        self.requests_url = requests_url.rstrip("/") if requests_url else None
        #: whether the endpoint answers a request's id back (takes urgency changes); None: not known yet
        self.takes_urgency_changes: bool | None = None
        #: urgency changes the endpoint accepted / that failed (logged; for metrics)
        self.urgency_updates_sent = 0
        self.urgency_updates_failed = 0
        self._control: aiohttp.ClientSession | None = None
        self._control_loop: asyncio.AbstractEventLoop | None = None
        self._senders: set[asyncio.Task[None]] = set()

    def fork(self) -> RemoteEndpoint:
        """A new client with the same settings (a blocking call's private event loop needs its own)."""
        return RemoteEndpoint(self.what, self.url, api_key=self._api_key, connect_timeout_s=self.connect_timeout_s,
                              max_connections=self.max_connections, headers=self._headers,
                              requests_url=self.requests_url)

    def session(self) -> aiohttp.ClientSession:
        """The shared HTTP session, created lazily in the running loop (with a new connection limiter)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            if self._session_loop is not loop:
                self.connections = PriorityLimiter(self.max_connections, name=f"{self.what.lower()} connections")
            headers = dict(self._headers)
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                # connect covers DNS and the TCP/TLS handshake; reads are bounded by the engine
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s,
                                              sock_connect=self.connect_timeout_s),
                # as many as the limiter lets through, so aiohttp never queues a request
                # itself (its wait would count as connecting, unseen and unordered)
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                               keepalive_timeout=KEEPALIVE_TIMEOUT_S),
            )
            self._session_loop = loop
        return self._session

    async def aclose(self) -> None:
        """Cancel and await the urgency senders, close the sessions (idempotent); a later request opens new ones."""
        senders, self._senders = list(self._senders), set()
        for sender in senders:
            sender.cancel()
        if senders:
            await asyncio.gather(*senders, return_exceptions=True)
        for session in (self._session, self._control):
            if session is not None and not session.closed:
                await session.close()
        self._session = self._session_loop = self._control = self._control_loop = None

    # ------------------------------------------------------------ urgency changes
    def follow(self, ticket: WorkTicket, stack: Any) -> Followed | None:
        """Send ``ticket``'s urgency changes to the endpoint until ``stack`` (an AsyncExitStack: the request's)
        closes; the returned `Followed` goes to `post`.  None (nothing sent) without ``requests_url`` or once
        the endpoint is known not to take changes.  Call it in the event loop, before `post`."""
        if self.requests_url is None or self.takes_urgency_changes is False:
            return None
        loop = asyncio.get_running_loop()
        followed = Followed(secrets.token_urlsafe(16))

        def schedule(urgency: Urgency) -> None:       # in the loop
            if not followed.open:
                return
            followed.pending = urgency
            if followed.sender is None or followed.sender.done():
                sender = followed.sender = loop.create_task(self._send_changes(followed),
                                                            name=f"{self.what.lower()} urgency")
                self._senders.add(sender)
                sender.add_done_callback(self._senders.discard)

        def changed(t: WorkTicket) -> None:           # any thread (whoever set the urgency)
            try:
                loop.call_soon_threadsafe(schedule, t.urgency)
            except RuntimeError:                      # the loop is closed: the request is over
                log.debug("%s endpoint %s: urgency change after the loop closed", self.what, self.url)

        remove = ticket.on_change(changed)

        def ended() -> None:
            followed.open = False
            remove()
        stack.callback(ended)
        return followed

    def _control_session(self) -> aiohttp.ClientSession:
        """The small session for urgency changes (not the streams' pool, which may be full), created lazily."""
        loop = asyncio.get_running_loop()
        if self._control is None or self._control.closed or self._control_loop is not loop:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._control = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=URGENCY_UPDATE_TIMEOUT_S),
                connector=aiohttp.TCPConnector(limit=URGENCY_UPDATE_CONNECTIONS,
                                               keepalive_timeout=KEEPALIVE_TIMEOUT_S))
            self._control_loop = loop
        return self._control

    async def _send_changes(self, followed: Followed) -> None:
        """Send ``followed``'s pending class until none is left (the latest wins; in order)."""
        while followed.pending is not None and self.takes_urgency_changes is not False:
            urgency, followed.pending = followed.pending, None
            await self._send_change(followed, urgency)

    async def _send_change(self, followed: Followed, urgency: Urgency) -> None:
        assert self.requests_url is not None
        url = f"{self.requests_url}/{followed.request_id}/urgency"
        what, status, code = "", 0, None
        for attempt in range(1, URGENCY_UPDATE_TRIES + 1):
            try:
                async with self._control_session().post(url, json={"urgency": urgency.name.lower()}) as resp:
                    if resp.status < 300:
                        self.urgency_updates_sent += 1
                        return
                    status, raw = resp.status, await resp.content.read(4096)
            except (TimeoutError, aiohttp.ClientError) as exc:
                what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                break
            code, message = _error_code(raw)
            what = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
            if status != 404:
                break
            if code == "request_finished" or not followed.open:
                # it finished there (its last bytes may still be on their way) or here: nothing left to change
                log.debug("%s endpoint: urgency change for a finished request (%s)", self.what, what)
                return
            if followed.pending is not None:    # a newer class follows: that one is sent (and tried) next
                return
            if followed.answered or attempt == URGENCY_UPDATE_TRIES:
                if followed.answered:
                    what += ("; the node that answered the request does not have it: does a balancer send "
                             "the change to another node?")
                break
            await asyncio.sleep(URGENCY_UPDATE_RETRY_S)     # not answered yet: the node may not have read it yet
        self.urgency_updates_failed += 1
        log.warning("%s endpoint %s: the urgency of request %s… was not changed to %s (%s); it goes on in its "
                    "old class there", self.what, self.url, followed.request_id[:8], urgency.name.lower(), what)

    def _answered(self, followed: Followed | None, headers: Mapping[str, str]) -> None:
        """At the first byte: did the endpoint answer the request's id back (does it take changes)?"""
        if followed is None:
            return
        followed.answered = True
        takes = headers.get(REQUEST_ID_HEADER) == followed.request_id
        if takes != self.takes_urgency_changes:
            self.takes_urgency_changes = takes
            if not takes:
                log.info("%s endpoint %s does not answer %s back: it takes no urgency changes (vLLM, SGLang "
                         "and hosted APIs do not); a request keeps the class it was sent with there",
                         self.what, self.url, REQUEST_ID_HEADER)

    def error(self, what: str, cls: type[EndpointError] = EndpointProtocolError) -> EndpointError:
        """An error of kind ``cls`` whose message names this endpoint's URL."""
        return cls(f"{self.what} endpoint {self.url}: {what}")

    def warn_if_full(self) -> None:
        """Say (at most every `_POOL_FULL_WARNING_INTERVAL_S`) that requests wait for a connection."""
        connections = self.connections
        if connections.busy < connections.slots:
            return
        now = time.monotonic()
        last = self._pool_full_warned_at
        if last is not None and now - last < _POOL_FULL_WARNING_INTERVAL_S:
            return
        self._pool_full_warned_at = now
        log.warning("%s endpoint %s: all %d connections (max_connections) are in use; new requests wait "
                    "for one (%d waiting); raise %s.max_connections if the server can take more",
                    self.what, self.url, connections.slots, connections.waiting + 1, self.what.lower())

    async def slot(self, ticket: WorkTicket, deadline: float, stack: Any, limit_s: float) -> None:
        """Enter a connection slot for ``ticket`` on ``stack`` (an AsyncExitStack) before ``deadline``
        (loop time); raises EndpointTimeout naming ``limit_s`` when none frees in time."""
        self.session()      # first, in a new loop: its limiter
        self.warn_if_full()
        connections = self.connections
        try:
            async with asyncio.timeout_at(deadline):
                await stack.enter_async_context(connections.slot(ticket))
        except TimeoutError:
            raise self.error(
                f"no free connection within {limit_s:g} s: all {connections.slots} (max_connections) in use, "
                f"{connections.waiting} requests waiting", EndpointTimeout,
            ) from None

    async def post(self, *, deadline: float, limit: str, ticket: WorkTicket | None = None, retries: int = 0,
                   followed: Followed | None = None, **request: Any) -> aiohttp.ClientResponse:
        """POST to `url` (``request``: aiohttp's ``json=`` / ``data=`` / ``headers=``; a callable ``data``
        is called for each try, for a body that can be sent once) → a response whose
        status is below 400, its headers read (the answer's first byte).

        Retries (see the module docstring) a refused connection or a 502/503/504, at most ``retries``
        times, while ``deadline`` (loop time) leaves room.  The urgency header is the ticket's at
        each send; at the response, `mark_first_byte` fills the ticket's network and remote queue.
        ``followed`` (`follow`): the request's id is sent, and whether the endpoint answers it back is noted.
        ``limit`` says, in a timeout's message, which limit ``deadline`` is.  Raises
        EndpointUnreachable, EndpointTimeout, EndpointDropped or EndpointHTTPError.  The caller owns
        the response (``release()`` when read, ``close()`` to drop the connection).
        """
        loop = asyncio.get_running_loop()
        session = self.session()
        extra = dict(request.pop("headers", None) or {})
        if followed is not None:
            extra[REQUEST_ID_HEADER] = followed.request_id
        attempt = 0
        while True:
            failure: EndpointError
            delay: float | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    body = {k: (v() if k == "data" and callable(v) else v) for k, v in request.items()}
                    resp = await session.post(self.url, headers={**extra, **urgency_header(ticket)}, **body)
            except TimeoutError:
                # aiohttp's own connect timeout also lands here (it is a TimeoutError)
                raise self.error(f"timed out connecting or waiting for the response (connect "
                                 f"{self.connect_timeout_s:g} s, {limit})", EndpointTimeout) from None
            except aiohttp.ClientConnectorError as exc:
                failure = self.error(f"cannot connect ({exc.os_error or exc})", EndpointUnreachable)
                failure.__cause__ = exc
            except aiohttp.ClientError as exc:
                # e.g. ServerDisconnectedError: it accepted the request, then closed: it may have done the work
                raise self.error(f"connection dropped before the response ({type(exc).__name__}: {exc})",
                                 EndpointDropped) from exc
            else:
                if resp.status < 400:
                    if ticket is not None:
                        mark_first_byte(ticket, resp.headers)
                    self._answered(followed, resp.headers)
                    return resp
                try:
                    what = f"HTTP {resp.status} {resp.reason or ''}".rstrip() + await body_excerpt(resp)
                    delay = retry_after_s(resp.headers.get("Retry-After"))
                finally:
                    resp.close()
                failure = EndpointHTTPError(f"{self.what} endpoint {self.url}: {what}", resp.status)
                if resp.status not in RETRYABLE_STATUSES:
                    raise failure
            if attempt >= retries:
                if attempt:
                    failure.add_note(f"after {attempt} retr{'y' if attempt == 1 else 'ies'}")
                raise failure
            wait = min(RETRY_AFTER_CAP_S, delay) if delay is not None else RETRY_BACKOFF_S * 2 ** attempt
            if loop.time() + wait >= deadline:
                failure.add_note(f"not retried: a retry in {wait:g} s would pass the {limit}")
                raise failure
            attempt += 1
            log.warning("%s (%s); retry %d of %d in %.2f s", failure, failure.kind, attempt, retries, wait)
            await asyncio.sleep(wait)


def _error_code(raw: bytes) -> tuple[str | None, str]:
    """OpenAI's ``{"error": {"code", "message"}}`` of an error body → (code or None, message excerpt)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None, " ".join(text.split())[:BODY_EXCERPT_CHARS]
    if not isinstance(err, dict):
        return None, str(err)[:BODY_EXCERPT_CHARS]
    code = err.get("code")
    return (code if isinstance(code, str) else None), str(err.get("message") or "")[:BODY_EXCERPT_CHARS]


async def body_excerpt(resp: aiohttp.ClientResponse, timeout_s: float = 2.0) -> str:
    """``": <text>"`` of an error answer's body (OpenAI's ``{"error": {"message"}}`` read out), at most
    `BODY_EXCERPT_CHARS`; "" when empty or unreadable within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await resp.content.read(4096)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return ""
    text = raw.decode("utf-8", errors="replace").strip()
    try:  # OpenAI-style {"error": {"message": ...}}
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
    except (ValueError, AttributeError):
        pass
    text = " ".join(text.split())
    if len(text) > BODY_EXCERPT_CHARS:
        text = text[:BODY_EXCERPT_CHARS] + "…"
    return f": {text}" if text else ""


def host_of(url: str) -> str:
    """``host:port`` of an http(s) URL (for engine names)."""
    return url.split("://", 1)[-1].split("/", 1)[0]


__all__ = ["Followed", "REQUEST_ID_HEADER", "RemoteEndpoint", "parse_server_timing", "mark_first_byte", "urgency_header", "retry_after_s",
           "body_excerpt", "host_of", "KEEPALIVE_TIMEOUT_S", "RETRY_AFTER_CAP_S", "RETRYABLE_STATUSES"]
