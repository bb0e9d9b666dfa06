"""The model node's side of the Server-Timing contract with a media node (issue 13).

Every model route (``/v1/audio/transcriptions``, ``/v1/audio/speech``,
``/v1/chat/completions``) answers the W3C Server-Timing header
(https://www.w3.org/TR/server-timing/)::

    Server-Timing: queue;dur=<ms>, work;dur=<ms>

* ``queue``: the request's `WorkTicket` on this node, submitted → started
  (the wait for the shared engine's scheduler);
* ``work``: started → the moment the response headers are sent (a whole
  transcript or completion; for a stream, the first chunk is ready and the
  headers go with it), plus work done before the engine was asked (decoding
  an upload: ``before_s``).

Durations in milliseconds, one decimal.  A media node's remote engine takes
both off the time to its first byte; what is left is the network
(`WorkTicket.network_s`, models/scheduling.py).

A request may carry ``X-Sub300-Urgency: committed|slack|speculative`` (the
media node's ticket class when it sent the request) so this node's schedulers
keep the deadline classes across the hop; absent means committed, any other
value is refused (`BadUrgency`: a 400, never a silent guess).
"""
from __future__ import annotations

from aiohttp import web

from sub300.models.scheduling import Urgency, WorkTicket

URGENCY_HEADER = "X-Sub300-Urgency"
_URGENCIES = {u.name.lower(): u for u in Urgency}


class BadUrgency(ValueError):
    """``X-Sub300-Urgency`` holds something other than committed, slack or speculative."""


def request_urgency(request: web.BaseRequest) -> Urgency:
    """The deadline class ``request`` asks for (`URGENCY_HEADER`; COMMITTED when absent).  Raises `BadUrgency`."""
    raw = request.headers.get(URGENCY_HEADER)
    if raw is None:
        return Urgency.COMMITTED
    urgency = _URGENCIES.get(raw.strip().lower())
    if urgency is None:
        raise BadUrgency(f"{URGENCY_HEADER} must be one of {', '.join(_URGENCIES)}, not {raw[:40]!r}")
    return urgency


def server_timing(ticket: WorkTicket, now: float | None = None, *, before_s: float = 0.0) -> str:
    """The header's value for ``ticket`` with the headers going out at ``now`` (``ticket.clock()`` by default).

    ``before_s``: work of this request done before its ticket was submitted (seconds; decoding an upload).
    A ticket the engine never marked started (an engine without a scheduler) counts all of its time as work.
    """
    now = ticket.clock() if now is None else now
    submitted = ticket.submitted if ticket.submitted is not None else now
    started = ticket.started if ticket.started is not None else submitted
    queue_s = max(0.0, started - submitted)
    work_s = max(0.0, now - started) + max(0.0, before_s)
    return f"queue;dur={queue_s * 1000.0:.1f}, work;dur={work_s * 1000.0:.1f}"


__all__ = ["URGENCY_HEADER", "BadUrgency", "request_urgency", "server_timing"]
