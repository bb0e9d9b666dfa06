"""Call tokens: short-lived JWTs a backend mints with its "calls" key and hands to its browser page.

The scheme LiveKit and Daily use for room tokens: the backend holds the
long-lived API key; the page only ever sees a token that starts calls for a
few minutes.  A token is an HS256 JWT (RFC 7519, signed with HMAC-SHA256,
RFC 7518 §3.2) with the claims

* ``sub`` — the id of the key that minted it (calls are attributed to it;
  a revoked key's tokens stop working, checked on every request);
* ``scope`` — ``"calls"``, the only thing a token allows;
* ``iat``, ``exp`` — issued at and expiry, Unix seconds (``auth.call_token_ttl_s``);
* ``jti`` — a random id (logs, and a future deny-list).

The signing secret comes from the environment variable named by
``auth.token_secret_env``; several nodes behind one load balancer must share
it.  Empty: a random secret per process (tokens die with a restart and do
not cross nodes), logged at WARNING.  Expiry is checked against an injected
clock (tests), with no leeway: the clocks are this process's.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jwt

log = logging.getLogger(__name__)
ALGORITHM = "HS256"
SCOPE = "calls"
#: HS256 keys shorter than the hash (32 bytes) weaken it (RFC 7518 §3.2): a configured secret must be this long
MIN_SECRET_BYTES = 32


class TokenError(ValueError):
    """A token that is malformed, badly signed, expired or not a call token; the message says which."""


@dataclass(frozen=True)
class CallToken:
    token: str
    key_id: str
    expires_at: float   # Unix seconds
    jti: str


class CallTokens:
    """Mints and checks call tokens with one HMAC secret (bytes) and a lifetime ``ttl_s``."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the call-token secret must have at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self.clock = clock

    @classmethod
    def from_config(cls, env_name: str, ttl_s: float, environ: Mapping[str, str] | None = None,
                    clock: Callable[[], float] = time.time) -> CallTokens:
        """The secret from ``$env_name`` (UTF-8, at least 32 bytes: else `ValueError`), or a random one, logged."""
        environ = os.environ if environ is None else environ
        value = environ.get(env_name, "") if env_name else ""
        if not value:
            log.warning("auth: $%s is empty: call tokens are signed with a random per-process secret "
                        "(they do not survive a restart and are not valid on other nodes)", env_name or "<unset>")
            return cls(secrets.token_bytes(32), ttl_s, clock)
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"${env_name} is too short for HS256: at least {MIN_SECRET_BYTES} bytes "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return cls(value.encode(), ttl_s, clock)

    def mint(self, key_id: str) -> CallToken:
        now = int(self.clock())
        jti = secrets.token_hex(8)
        expires_at = now + int(self.ttl_s)
        claims = {"sub": key_id, "scope": SCOPE, "iat": now, "exp": expires_at, "jti": jti}
        return CallToken(jwt.encode(claims, self._secret, algorithm=ALGORITHM), key_id, float(expires_at), jti)

    def verify(self, token: str) -> CallToken:
        """The token's claims, or `TokenError`: bad signature or shape, expired (clock ≥ exp), not a call token."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM],
                                options={"verify_exp": False, "verify_iat": False,
                                         "require": ["sub", "exp", "iat", "jti"]})
        except jwt.InvalidTokenError as error:
            raise TokenError(f"invalid call token: {error}") from None
        exp, sub = claims["exp"], claims["sub"]
        if not isinstance(exp, int | float) or not isinstance(sub, str):
            raise TokenError("invalid call token: malformed claims")
        if claims.get("scope") != SCOPE:
            raise TokenError("not a call token")
        if self.clock() >= exp:
            raise TokenError("call token expired")
        return CallToken(token, sub, float(exp), str(claims["jti"]))


def looks_like_jwt(text: str) -> bool:
    """Three base64url parts joined by dots: a token, not an API key."""
    return text.count(".") == 2 and not text.startswith("s300_")
