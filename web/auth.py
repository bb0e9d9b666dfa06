"""Who may call, on the web side: the auth middleware, the scope table, call tokens, keys, TURN for the page.

Every request passes `auth_middleware`.  The route's scope comes from
`SCOPE_TABLE` (by path prefix); open routes (the page, its static files,
health, metrics, ``/webrtc/config``) need nothing.  Otherwise the request
carries ``Authorization: Bearer <API key secret | call token>``, or, for a
browser that cannot set headers (the demo page's URL, a WebSocket),
``?token=<call token>`` — never an API key in a URL (URLs end up in logs and
browser history).  ``/ws/twilio`` (`DEFERRED_AUTH_PATHS`) may also be opened with no
credential: its token comes in the stream's ``start`` event and
web/websocket.py checks it before the call is admitted.  Answers, JSON like the rest of the API (OpenAI-shaped
``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``,
``{"error": message, ...}`` elsewhere):

* 401 with ``WWW-Authenticate: Bearer realm="sub300"`` (RFC 6750 §3; with
  ``error="invalid_token"`` when a credential was given but is unknown,
  revoked, expired or malformed);
* 403 with ``error="insufficient_scope"`` when the key lacks the route's scope
  (RFC 6750 §3.1);
* 429 with ``Retry-After`` (seconds) and the limit's name
  (agent/auth/limits.py) when a limit per key or per source refuses.

An admitted request carries ``request[PRINCIPAL]``, a `Principal`; its ``source`` is the caller's IP
(`client_address`: the TCP peer, or the X-Forwarded-For hop behind ``auth.trusted_proxies``).  With
authentication off (`auth_mode`) every request is ``Principal(None, all
scopes, source, "open")`` — and the per-source limits still apply.

The counted requests: ``POST /offer`` and a ``/ws…`` request are new calls
(a calls-at-once slot rides in ``request["call_slot"]``: signalling takes it
for an answered call and releases it when the call ends; otherwise it is
released when the handler returns, which for a WebSocket is when it closes);
``POST /v1/chat/completions``, ``/v1/audio/transcriptions`` and ``/v1/audio/speech`` are model requests.

Routes added by `add_auth_routes`:

* ``POST /v1/call-tokens`` (scope "calls", with an API key, not a token; with
  authentication off too, when a valid key is given) → ``{"token",
  "expires_at", "key_id"}``: the backend hands the token to its page
  (``/#token=…`` or ``/?token=…``), whose ``/offer`` carries it;
* ``GET /v1/keys``, ``POST /v1/keys`` ``{"name", "scopes", "record_audio"}``
  (the secret is in this answer only), ``DELETE /v1/keys/{id}`` (scope "admin").
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer

from sub300.agent.auth.authenticator import Authenticator, AuthFailed, Principal
from sub300.agent.auth.keys import SCOPES, ApiKey, BadScopes, KeyStore, new_key
from sub300.agent.auth.limits import CallSlot, LimitExceeded, Limits
from sub300.agent.auth.tokens import CallTokens, looks_like_jwt
from sub300.agent.auth.turn import minted_ice_servers, turn_secret
from sub300.agent.config import Config, WebRtcConfig
from sub300.agent.log_format import KEY_ID
from sub300.media.webrtc.ice import ice_servers, rtc_configuration

__all__ = ["AUTH_KEY", "CALL_SLOT", "PRINCIPAL", "SCOPE_TABLE", "AuthState", "Principal", "add_auth_routes",
           "auth_middleware", "auth_mode", "page_auth", "page_ice_servers", "required_scope",
           "server_rtc_configuration"]

log = logging.getLogger(__name__)
#: who made an admitted request (records, the admin routes and the OpenAI API read it: ``request.get(PRINCIPAL)``)
PRINCIPAL = web.RequestKey("principal", Principal)
#: a new call's slot under the limits, until signalling takes it with the call
CALL_SLOT = web.RequestKey("call_slot", CallSlot)
REALM = "sub300"
OPEN = ""   # the scope of a route anyone may use

#: (path prefix, scope): the first prefix that matches the path (equal to it, or followed by "/") wins;
#: "/ws" also matches "/ws…".  A path that matches none needs the "admin" scope (an unknown route of
#: tomorrow is closed, not open); a path with no route at all is a 404 for anyone.
SCOPE_TABLE: tuple[tuple[str, str], ...] = (
    ("/offer", "calls"),
    ("/v1/call-tokens", "calls"),
    ("/ws", "calls"),
    ("/v1/chat/completions", "model"),
    ("/v1/audio", "model"),
    ("/v1/models", "model"),
    ("/v1/requests", "model"),      # a model request's urgency change (web/request_urgency.py)
    ("/v1/usage", "usage"),
    ("/v1/calls", "admin"),
    ("/v1/keys", "admin"),
    ("/static", OPEN),
    ("/healthz", OPEN),
    ("/readyz", OPEN),
    ("/livez", OPEN),
    ("/metrics", OPEN),
    ("/webrtc/config", OPEN),
)
_NEW_CALL_PATHS = ("/offer",)   # POST; and every /ws… request
#: WebSocket routes whose upgrade may come without a credential when authentication is on: Twilio's <Stream url>
#: takes no query string, so the call token rides in the stream's start event (web/websocket.py checks it there,
#: before the call is admitted); the request gets ``Principal(None, no scopes, source, "deferred")``
DEFERRED_AUTH_PATHS = ("/ws/twilio",)
_MODEL_REQUEST_PATHS = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/speech")   # POST


def required_scope(path: str) -> str:
    """The scope a path needs (`OPEN`: none), per `SCOPE_TABLE`."""
    if path == "/":
        return OPEN
    for prefix, scope in SCOPE_TABLE:
        if path == prefix or path.startswith(prefix + "/") or (prefix == "/ws" and path.startswith(prefix)):
            return scope
    return "admin"


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """The caller's IP: the TCP peer, or — when the peer is a trusted proxy (``auth.trusted_proxies``) — the
    rightmost X-Forwarded-For address that is not one (the usual walk from the right: every hop to its
    right is a proxy we trust to have appended what it saw; anything to its left the client could forge)."""
    peer = request.remote or "unknown"
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", ())
            for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            log.info("X-Forwarded-For from proxy %s has a malformed hop %r: the proxy is the source", peer, hop[:60])
            return peer
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else peer


def auth_mode(config: Config) -> tuple[bool, str]:
    """(authentication on?, why) from ``auth.required`` and ``server.host``: for the start-up line."""
    mode, host = config.auth.required, config.server.host
    if mode == "on":
        return True, "auth.required = on"
    if mode == "off":
        return False, "auth.required = off: anyone who reaches the port may start calls and use /v1/*"
    if _is_loopback(host):
        return False, f"auth.required = auto and server.host {host} is loopback: only this machine can connect"
    return True, f"auth.required = auto and server.host {host} is not loopback"


@dataclass
class AuthState:
    """What the middleware and the routes share (``app[AUTH_KEY]``)."""

    config: Config
    enabled: bool
    why: str
    store: KeyStore
    tokens: CallTokens
    authenticator: Authenticator
    limits: Limits
    environ: Mapping[str, str] | None = None
    trusted: tuple[Network, ...] = ()

    def describe(self) -> str:
        """The start-up line: on or off and why (for `sub300 serve`'s progress output)."""
        return f"authentication {'on' if self.enabled else 'off'}: {self.why}"


AUTH_KEY = web.AppKey("auth", AuthState)


# ------------------------------------------------------------------ answers
def _error(request: web.Request, status: int, message: str, err_type: str, code: str,
           headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message, "type": err_type, "param": None, "code": code,
                                          **extra}}
    else:
        body = {"error": message, "code": code, **extra}
    return web.json_response(body, status=status, headers=headers)


def _unauthorized(request: web.Request, message: str, invalid: bool) -> web.Response:
    challenge = f'Bearer realm="{REALM}"'
    if invalid:
        challenge += f', error="invalid_token", error_description="{message.replace(chr(34), chr(39))}"'
    return _error(request, 401, message, "authentication_error", "invalid_api_key" if invalid else "missing_api_key",
                  {"WWW-Authenticate": challenge})


def _too_many(request: web.Request, refused: LimitExceeded) -> web.Response:
    principal = request.get(PRINCIPAL)
    source = principal.source if principal is not None else request.remote
    log.info("%s %s from %s refused: %s", request.method, request.path, source, refused.message)
    return _error(request, 429, refused.message, "rate_limit_error", "rate_limit_exceeded",
                  {"Retry-After": str(refused.retry_after_s)}, limit=refused.limit, allowed=refused.allowed,
                  retry_after_s=refused.retry_after_s)


def _credential(request: web.Request) -> tuple[str | None, bool]:
    """(the credential, whether it came from the URL)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        return (value.strip() or None, False) if scheme.lower() == "bearer" else (None, False)
    token = request.query.get("token")
    return (token.strip() or None, True) if token is not None else (None, False)


# ------------------------------------------------------------------ the middleware
@web.middleware
async def auth_middleware(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """See the module docstring.  Does nothing on an app without `add_auth_routes`."""
    state = request.app.get(AUTH_KEY)
    if state is None or request.match_info.http_exception is not None:   # not wired, or a 404/405 anyway
        return await handler(request)
    source = client_address(request, state.trusted)
    scope = required_scope(request.path)
    credential, from_url = _credential(request)
    if scope == OPEN:
        principal = Principal(None, frozenset(), source, "anonymous")
        if not state.enabled:
            principal = await _open_principal(state, credential, from_url, source)
        elif credential is not None and (not from_url or looks_like_jwt(credential)):
            try:   # an open route with a credential: known callers get more (TURN credentials of their own)
                principal = await state.authenticator.authenticate(credential, source)
            except AuthFailed:
                pass
        request[PRINCIPAL] = principal
        return await handler(request)
    if not state.enabled:
        principal = await _open_principal(state, credential, from_url, source)
    else:
        if credential is None and request.path in DEFERRED_AUTH_PATHS:   # the limits apply; the token comes later
            request[PRINCIPAL] = deferred = Principal(None, frozenset(), source, "deferred")
            return await _limited(request, handler, state, deferred, source)
        if credential is None:
            return _unauthorized(request, "authentication required: Authorization: Bearer <API key or call token>",
                                 invalid=False)
        if from_url and not looks_like_jwt(credential):
            return _unauthorized(request, "only a call token may ride in the URL (?token=); send API keys "
                                          "in the Authorization header", invalid=True)
        try:
            principal = await state.authenticator.authenticate(credential, source)
        except AuthFailed as error:
            log.info("%s %s from %s: 401 %s", request.method, request.path, source, error)
            return _unauthorized(request, str(error), invalid=True)
        if scope not in principal.scopes:
            log.info("%s %s from %s: 403 key %s lacks scope %r", request.method, request.path, source,
                     principal.key_id, scope)
            return _error(request, 403, f"this {'call token' if principal.via == 'token' else 'API key'} "
                                        f"lacks the {scope!r} scope", "permission_error", "insufficient_scope",
                          {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", '
                                               f'scope="{scope}"'})
    request[PRINCIPAL] = principal
    key_token = KEY_ID.set(principal.key_id)   # this request's log lines carry its key (agent/log_format.py)
    try:
        return await _limited(request, handler, state, principal, source)
    finally:
        KEY_ID.reset(key_token)


async def _open_principal(state: AuthState, credential: str | None, from_url: bool, source: str) -> Principal:
    """Authentication off: every scope for anyone, but a valid key or call token still names its key, so a
    backend's calls and model requests on a development server are attributed (records, usage, limits) as
    they will be in production.  A credential that does not check out is logged and ignored."""
    anyone = Principal(None, frozenset(SCOPES), source, "open")
    if credential is None or (from_url and not looks_like_jwt(credential)):
        return anyone
    try:
        known = await state.authenticator.authenticate(credential, source)
    except AuthFailed as error:
        log.info("authentication off: a credential from %s was ignored (%s)", source, error)
        return anyone
    return Principal(known.key_id, frozenset(SCOPES), source, "open", known.record_audio)


async def _limited(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                   state: AuthState, principal: Principal, source: str) -> web.StreamResponse:
    """The handler behind the limits of `auth_middleware`: new calls and model requests."""
    new_call = (request.method == "POST" and request.path in _NEW_CALL_PATHS) or request.path.startswith("/ws")
    if new_call:
        slot = state.limits.new_call(principal.key_id, source)
        if isinstance(slot, LimitExceeded):
            return _too_many(request, slot)
        request[CALL_SLOT] = slot
        try:
            return await handler(request)
        finally:
            left = request.pop(CALL_SLOT, None)   # signalling took it when it answered the call
            if left is not None:
                left.release()
    if request.method == "POST" and request.path in _MODEL_REQUEST_PATHS:
        refused = state.limits.model_request(principal.key_id, source)
        if refused is not None:
            return _too_many(request, refused)
    return await handler(request)


# ------------------------------------------------------------------ the page
def page_auth(request: web.Request) -> dict[str, Any]:
    """What ``/webrtc/config`` tells the page: ``{"required": bool, "authenticated": bool}``."""
    state = request.app.get(AUTH_KEY)
    principal = request.get(PRINCIPAL)
    enabled = state is not None and state.enabled
    return {"required": enabled,
            "authenticated": principal is not None and principal.key_id is not None}


def page_ice_servers(request: web.Request, config: WebRtcConfig,
                     environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The page's iceServers: under authentication, a page without a valid token gets STUN only (a TURN relay
    costs bandwidth: not for anyone who can load the page).  Otherwise, with ``$webrtc.turn_secret_env`` set,
    TURN credentials minted for this request's key (``anon`` when authentication is off); without it, the
    static ``turn_username`` and its long-lived credential (a lab setting)."""
    state = request.app.get(AUTH_KEY)
    environ = state.environ if environ is None and state is not None else environ
    principal = request.get(PRINCIPAL)
    if state is not None and state.enabled and (principal is None or principal.key_id is None):
        return [{"urls": list(config.stun_urls)}] if config.stun_urls else []
    secret = turn_secret(config, environ)
    if not secret:
        return ice_servers(config, environ)
    return minted_ice_servers(config, principal.key_id if principal is not None else None, secret)


def server_rtc_configuration(config: WebRtcConfig, environ: Mapping[str, str] | None = None) -> RTCConfiguration:
    """The server's own peer connections: minted TURN credentials (user ``sub300``) when the secret is set."""
    secret = turn_secret(config, environ)
    if not secret:
        return rtc_configuration(config, environ)
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in minted_ice_servers(config, "sub300", secret)
    ])


# ------------------------------------------------------------------ routes
def _key_dict(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "scopes": sorted(key.scopes), "created_at": key.created_at,
            "revoked_at": key.revoked_at, "active": key.active, "record_audio": key.record_audio}


async def _call_tokens(request: web.Request) -> web.Response:
    state = request.app[AUTH_KEY]
    principal: Principal = request[PRINCIPAL]
    if not state.enabled:   # a backend written for production still gets its token (/offer attributes the call)
        credential, from_url = _credential(request)
        try:
            if credential is None or from_url:
                raise AuthFailed("no API key")
            principal = await state.authenticator.authenticate(credential, principal.source)
        except AuthFailed:
            return _error(request, 400, f"authentication is off ({state.why}): /offer needs no token "
                                        "(with an API key of scope 'calls', this route mints one anyway)",
                          "invalid_request_error", "auth_off")
        if "calls" not in principal.scopes:
            return _error(request, 403, "this API key lacks the 'calls' scope", "permission_error",
                          "insufficient_scope")
    if principal.via != "key" or principal.key_id is None:
        return _error(request, 403, "call tokens are minted with an API key, not with another token",
                      "permission_error", "insufficient_scope")
    token = state.tokens.mint(principal.key_id)
    log.info("call token %s minted for key %s (expires %d)", token.jti, token.key_id, token.expires_at)
    return web.json_response({"token": token.token, "expires_at": token.expires_at, "key_id": token.key_id})


async def _list_keys(request: web.Request) -> web.Response:
    keys = await asyncio.to_thread(request.app[AUTH_KEY].store.list_keys)
    return web.json_response({"keys": [_key_dict(k) for k in keys]})


async def _create_key(request: web.Request) -> web.Response:
    state = request.app[AUTH_KEY]
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
        return _error(request, 400, 'body must be {"name": str, "scopes": [...], "record_audio": bool}',
                      "invalid_request_error", "bad_request")
    scopes = body.get("scopes", [])
    if not isinstance(scopes, str | list) or (isinstance(scopes, list) and not all(isinstance(s, str) for s in scopes)):
        return _error(request, 400, '"scopes" must be a list of strings', "invalid_request_error", "bad_request")
    try:
        key, secret = new_key(body["name"].strip()[:200], scopes, record_audio=bool(body.get("record_audio")))
    except BadScopes as error:
        return _error(request, 400, str(error), "invalid_request_error", "bad_scopes")
    await asyncio.to_thread(state.store.add_key, key)
    log.info("API key %s (%s, scopes %s) created by key %s", key.id, key.name, ",".join(sorted(key.scopes)),
             request[PRINCIPAL].key_id)
    return web.json_response({**_key_dict(key), "secret": secret}, status=201)


async def _revoke_key(request: web.Request) -> web.Response:
    state = request.app[AUTH_KEY]
    key_id = request.match_info["key_id"]
    revoked = await asyncio.to_thread(state.store.revoke_key, key_id, time.time())
    state.authenticator.forget(key_id)
    if not revoked:
        return _error(request, 404, f"no active key {key_id[:40]!r}", "invalid_request_error", "not_found")
    log.info("API key %s revoked by key %s", key_id, request[PRINCIPAL].key_id)
    return web.json_response({"id": key_id, "revoked": True})


def add_auth_routes(app: web.Application, config: Config, store: KeyStore, *, tokens: CallTokens | None = None,
                    limits: Limits | None = None, enabled: bool | None = None,
                    environ: Mapping[str, str] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> AuthState:
    """Wire authentication into ``app`` (before it starts): the middleware, ``app[AUTH_KEY]`` and the routes.

    ``store``: where keys are (`sub300.agent.records.open_store(config)` under ``sub300 serve``; a
    `MemoryKeyStore` in tests).  ``enabled``: default `auth_mode(config)`.  ``tokens``: default from
    ``$auth.token_secret_env`` (`CallTokens.from_config`; `ValueError` when it is too short).  ``clock``:
    the key cache's (monotonic).  Returns the state (its ``limits`` are the process's per-key/source limits;
    ``describe()`` is the start-up line).  Reads the store once (blocking) to warn when no key is active.
    """
    on, why = auth_mode(config)
    if enabled is not None and enabled != on:
        on, why = enabled, f"set by the caller ({'on' if enabled else 'off'})"
    tokens = tokens or CallTokens.from_config(config.auth.token_secret_env, config.auth.call_token_ttl_s, environ)
    state = AuthState(config, on, why, store, tokens, Authenticator(store, tokens, clock=clock),
                      limits or Limits(config.auth), environ,
                      tuple(ipaddress.ip_network(c, strict=False) for c in config.auth.trusted_proxies))
    app[AUTH_KEY] = state
    if on:
        active = [k for k in store.list_keys() if k.active]
        if not active:
            log.warning("authentication is on (%s) and there is no active API key: every call and /v1 request "
                        "gets 401; create one with `sub300 keys create --name NAME --scopes calls,model`", why)
        else:
            log.info("authentication on (%s): %d active API key(s)", why, len(active))
    else:
        log.warning("authentication off (%s); per-source limits still apply", why)
    if auth_middleware not in app.middlewares:
        app.middlewares.append(auth_middleware)
    app.router.add_post("/v1/call-tokens", _call_tokens)
    app.router.add_get("/v1/keys", _list_keys)
    app.router.add_post("/v1/keys", _create_key)
    app.router.add_delete("/v1/keys/{key_id}", _revoke_key)
    return state

