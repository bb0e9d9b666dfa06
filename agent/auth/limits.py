"""Limits per API key and per source address: new calls and model requests per minute, calls at once.

Rates use the `limits` library's moving window (``MovingWindowRateLimiter``
over ``MemoryStorage``: each hit's time is kept for a minute, so "N per
minute" holds over every 60 s span, not per calendar minute).  In memory,
per process: N nodes behind a balancer allow N times the rate.  Calls at
once are plain counters, taken by `new_call` and given back by the returned
`CallSlot` when the call ends (WebRTC: web/signalling.py when it forgets
the call, after the observers' ``call_ended``).

Each limit is a field of ``[auth]`` (agent/config.py); 0 turns it off.  The
key limits apply to authenticated requests (a key, or a token minted by
it); the source limits always apply, authentication on or off.  A refusal
is a `LimitExceeded` naming the limit; the web layer answers it 429 with
``Retry-After``: for a rate, the seconds until the window's oldest hit
leaves it (the window's reset, `limits`' ``WindowStats.reset_time``),
rounded up; for calls at once, ``retry_after_s`` (no clock says when a call
ends).  What counts: every ``POST /offer`` that passes authentication
(answered or not: attempts are what a flood is made of), every
``POST /v1/chat/completions``, and every new SIP INVITE (`sip_invite`).
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from sub300.agent.config import AuthConfig

log = logging.getLogger(__name__)
#: Retry-After (s) when a calls-at-once limit refuses
CONCURRENT_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class LimitExceeded:
    """Which limit refused: ``limit`` is its ``[auth]`` field name, ``subject`` "key" or "source"."""

    limit: str
    subject: str
    allowed: int
    retry_after_s: int

    @property
    def message(self) -> str:
        what = {"calls_per_minute": "new calls per minute", "max_concurrent_calls": "calls at once",
                "model_requests_per_minute": "model requests per minute",
                "invites_per_minute": "INVITEs per minute"}
        name = self.limit.split("_", 1)[1]
        return f"too many {what.get(name, name)} for this {'API key' if self.subject == 'key' else 'address'} " \
               f"(at most {self.allowed}); retry in {self.retry_after_s} s"

    def to_dict(self) -> dict:
        return {"error": self.message, "limit": self.limit, "allowed": self.allowed,
                "retry_after_s": self.retry_after_s}


class CallSlot:
    """A call's place in the calls-at-once counters; `release` (idempotent) gives it back."""

    def __init__(self, limits: Limits, subjects: list[tuple[str, str]]) -> None:
        self._limits = limits
        self._subjects = subjects
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limits._release(self._subjects)


class Limits:
    """The limits of one process, from ``[auth]``."""

    def __init__(self, config: AuthConfig, concurrent_retry_after_s: int = CONCURRENT_RETRY_AFTER_S) -> None:
        self.config = config
        self.concurrent_retry_after_s = concurrent_retry_after_s
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._active: Counter[tuple[str, str]] = Counter()   # (subject, id) → calls at once

    # ------------------------------------------------------------ rates
    def _rates(self, checks: list[tuple[str, str, str | None, int]]) -> LimitExceeded | None:
        """checks: (limit name, subject, id, per minute).  All are tested before any is hit: a refusal costs nothing."""
        items: list[tuple[RateLimitItem, str, str]] = []
        for name, subject, ident, per_minute in checks:
            if ident is None or per_minute <= 0:
                continue
            item: RateLimitItem = RateLimitItemPerMinute(per_minute, namespace=name)
            if not self._limiter.test(item, subject, ident):
                stats = self._limiter.get_window_stats(item, subject, ident)
                retry = max(1, math.ceil(stats.reset_time - time.time()))
                return LimitExceeded(name, subject, per_minute, retry)
            items.append((item, subject, ident))
        for item, subject, ident in items:
            self._limiter.hit(item, subject, ident)
        return None

    def model_request(self, key_id: str | None, source: str | None) -> LimitExceeded | None:
        """One model request (``POST /v1/chat/completions``): None when allowed (and counted)."""
        c = self.config
        return self._rates([("key_model_requests_per_minute", "key", key_id, c.key_model_requests_per_minute),
                            ("source_model_requests_per_minute", "source", source,
                             c.source_model_requests_per_minute)])

    def sip_invite(self, source: str) -> LimitExceeded | None:
        """One new SIP INVITE from ``source`` (an IP): None when allowed (and counted)."""
        return self._rates([("sip_invites_per_minute", "source", source, self.config.sip_invites_per_minute)])

    # ------------------------------------------------------------ calls
    def new_call(self, key_id: str | None, source: str | None) -> CallSlot | LimitExceeded:
        """A new call's attempt: the per-minute rates, then the calls at once; a `CallSlot` when both allow it."""
        c = self.config
        subjects = [(s, i) for s, i in (("key", key_id), ("source", source)) if i is not None]
        caps = {"key": c.key_max_concurrent_calls, "source": c.source_max_concurrent_calls}
        for subject, ident in subjects:
            cap = caps[subject]
            if cap > 0 and self._active[(subject, ident)] >= cap:
                return LimitExceeded(f"{subject}_max_concurrent_calls", subject, cap, self.concurrent_retry_after_s)
        refused = self._rates([("key_calls_per_minute", "key", key_id, c.key_calls_per_minute),
                               ("source_calls_per_minute", "source", source, c.source_calls_per_minute)])
        if refused is not None:
            return refused
        for subject_id in subjects:
            self._active[subject_id] += 1
        return CallSlot(self, subjects)

    def _release(self, subjects: list[tuple[str, str]]) -> None:
        for subject_id in subjects:
            self._active[subject_id] -= 1
            if self._active[subject_id] <= 0:
                del self._active[subject_id]

    def active(self, subject: str, ident: str) -> int:
        """Calls at once now for ("key" | "source", id)."""
        return self._active.get((subject, ident), 0)
