"""Who is asking: an API key's secret or a call token → a `Principal`, or `AuthFailed`.

Keys are read from the `KeyStore` (the records database under `sub300
serve`) on every request, through a small cache: a key is re-read at most
``cache_ttl_s`` (5 s) after it was last read, so a key revoked by
``sub300 keys revoke`` in another process stops working within 5 s on every
node, and at once in this process when revoked through it (`forget`).  The
store is blocking; a cache miss reads it in a worker thread.

A call token (agent/auth/tokens.py) is checked for its signature and
expiry, then its key (``sub``) must still be active and hold the "calls"
scope: revoking a key ends its tokens too.  A token grants only "calls".
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .keys import ApiKey, KeyStore, hash_secret, key_id_of
from .tokens import SCOPE as TOKEN_SCOPE
from .tokens import CallTokens, TokenError, looks_like_jwt

log = logging.getLogger(__name__)
#: how long a key read from the store is trusted (s): the bound on how late a revocation elsewhere takes effect
KEY_CACHE_TTL_S = 5.0


@dataclass(frozen=True)
class Principal:
    """Who a request is: ``key_id`` (None when authentication is off or nobody authenticated),
    ``scopes`` it holds, ``source`` its network address (IP); ``via`` "key" | "token" | "open"
    (authentication off: every scope) | "anonymous" (an open route, no credential);
    ``record_audio``: its key asks for its calls' audio to be recorded."""

    key_id: str | None
    scopes: frozenset[str]
    source: str
    via: str = "key"
    record_audio: bool = False


class AuthFailed(Exception):
    """No usable credential: the message says why (for the 401 body and the log)."""


class Authenticator:
    """Checks secrets and tokens against ``store`` (`KeyStore`) and ``tokens`` (`CallTokens`)."""

    def __init__(self, store: KeyStore, tokens: CallTokens, *, cache_ttl_s: float = KEY_CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic, max_cached: int = 10_000) -> None:
        self.store = store
        self.tokens = tokens
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self.max_cached = max_cached
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def key(self, key_id: str) -> ApiKey | None:
        """The stored key (or None), at most ``cache_ttl_s`` old."""
        now = self.clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[1] < self.cache_ttl_s:
            return cached[0]
        key = await asyncio.to_thread(self.store.key_by_id, key_id)
        if len(self._cache) >= self.max_cached:   # random ids must not grow the cache without bound
            self._cache.clear()
        self._cache[key_id] = (key, self.clock())
        return key

    def forget(self, key_id: str) -> None:
        """Drop a cached key (revoked or changed in this process)."""
        self._cache.pop(key_id, None)

    async def authenticate(self, credential: str, source: str) -> Principal:
        """An API key's secret or a call token → its Principal; `AuthFailed` otherwise."""
        if looks_like_jwt(credential):
            try:
                token = self.tokens.verify(credential)
            except TokenError as error:
                raise AuthFailed(str(error)) from None
            key = await self.key(token.key_id)
            if key is None or not key.active:
                raise AuthFailed("call token of a revoked or unknown API key")
            if TOKEN_SCOPE not in key.scopes:
                raise AuthFailed("call token of an API key without the 'calls' scope")
            return Principal(key.id, frozenset({TOKEN_SCOPE}), source, "token", key.record_audio)
        key_id = key_id_of(credential)
        if key_id is None:
            raise AuthFailed("not an API key (s300_…) nor a call token")
        key = await self.key(key_id)
        # compared in constant time; an unknown id costs the same comparison
        stored = key.secret_hash if key is not None else "0" * 64
        if not hmac.compare_digest(stored, hash_secret(credential)) or key is None:
            raise AuthFailed("unknown API key")
        if not key.active:
            raise AuthFailed("API key revoked")
        return Principal(key.id, key.scopes, source, "key", key.record_audio)
