"""Short-lived TURN credentials from a shared secret: the TURN REST API scheme coturn implements.

draft-uberti-behave-turn-rest-00 §2.2 (coturn's ``use-auth-secret`` with
``static-auth-secret``): the web service and the TURN server share a secret;
for each page the service mints

* ``username`` = ``"<expiry>:<user>"`` — expiry in Unix seconds (now +
  ``webrtc.turn_credential_ttl_s``), the user being the API key's id or
  ``anon`` when authentication is off;
* ``credential`` = base64(HMAC-SHA1(secret, username)).

The TURN server recomputes the HMAC and refuses a username whose expiry has
passed (coturn answers 401), so a leaked credential dies with its TTL and the
long-lived secret never leaves the server.  With no secret configured the
page gets the static ``turn_username``/credential of `media.webrtc.ice`
(the long-lived password: fine for a lab, not for production).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from typing import Any

from sub300.agent.config import WebRtcConfig

ANONYMOUS = "anon"


def turn_credentials(secret: str, user: str, ttl_s: float, now: float) -> tuple[str, str]:
    """(username, credential) valid until ``now + ttl_s`` (Unix seconds) for coturn's ``static-auth-secret``."""
    username = f"{int(now + ttl_s)}:{user}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def turn_secret(config: WebRtcConfig, environ: Mapping[str, str] | None = None) -> str:
    """The shared secret from ``$webrtc.turn_secret_env`` ('' when unset)."""
    environ = os.environ if environ is None else environ
    return environ.get(config.turn_secret_env, "") if config.turn_secret_env else ""


def minted_ice_servers(config: WebRtcConfig, user: str | None, secret: str,
                       now: float | None = None) -> list[dict[str, Any]]:
    """The page's iceServers (RTCIceServer shape) with minted TURN credentials for ``user`` (None: anon)."""
    now = time.time() if now is None else now
    servers: list[dict[str, Any]] = []
    if config.stun_urls:
        servers.append({"urls": list(config.stun_urls)})
    if config.turn_urls:
        username, credential = turn_credentials(secret, user or ANONYMOUS, config.turn_credential_ttl_s, now)
        servers.append({"urls": list(config.turn_urls), "username": username, "credential": credential})
    return servers
