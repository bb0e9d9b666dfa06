"""Who may call: API keys, scopes, call tokens, limits (429 + Retry-After), the loopback default, TURN for the page.

The app is `build_app` on named fake engines (no model) with `add_auth_routes` and a `MemoryKeyStore`,
served by aiohttp's TestServer on 127.0.0.1.  Token expiry and the key cache run on controllable clocks.
"""
from __future__ import annotations

import asyncio
import copy
import json
import time

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from sub300.agent.auth.authenticator import KEY_CACHE_TTL_S
from sub300.agent.auth.keys import BadScopes, hash_secret, key_id_of, new_key, parse_scopes, verify_secret
from sub300.agent.auth.limits import LimitExceeded, Limits
from sub300.agent.auth.memory_store import MemoryKeyStore
from sub300.agent.auth.tokens import CallTokens, TokenError
from sub300.agent.auth.turn import turn_credentials
from sub300.agent.calls import ObserverGroup
from sub300.testing.fakes import fake_engines
from sub300.web.auth import add_auth_routes, auth_mode, client_address, required_scope
from sub300.web.server import SIGNALLING_KEY, build_app

from .test_webrtc_offers import body, seed_offer

SECRET = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ContextRecorder:
    """A CallObserver that keeps each call's CallContext."""

    def __init__(self) -> None:
        self.contexts: dict[str, object] = {}

    def call_started(self, transport, call_id, context=None):
        self.contexts[call_id] = context
        return lambda event: None

    def call_ended(self, transport, call_id, reason):
        pass


class AuthApp:
    """The web app with authentication; ``keys[name]`` = (ApiKey, secret)."""

    def __init__(self, config, *, enabled: bool = True, auth: dict | None = None, environ=None,
                 webrtc: dict | None = None) -> None:
        config = copy.deepcopy(config)
        for key, value in (auth or {}).items():
            setattr(config.auth, key, value)
        for key, value in (webrtc or {}).items():
            setattr(config.webrtc, key, value)
        self.config = config
        self.store = MemoryKeyStore()
        self.keys = {}
        for name, scopes, record in (("caller", "calls", True), ("model", "model", False),
                                     ("admin", "admin,usage", False)):
            key, secret = new_key(name, scopes, record_audio=record)
            self.store.add_key(key)
            self.keys[name] = (key, secret)
        self.wall = Clock(1_800_000_000.0)    # tokens: Unix seconds
        self.mono = Clock(100.0)              # the key cache
        self.app = build_app(config, fake_engines())
        self.recorder = ContextRecorder()
        signalling = self.app[SIGNALLING_KEY]
        signalling.observer = ObserverGroup([signalling.observer, self.recorder])
        self.state = add_auth_routes(self.app, config, self.store, enabled=enabled,
                                     tokens=CallTokens(SECRET, config.auth.call_token_ttl_s, self.wall),
                                     environ=environ or {}, clock=self.mono)
        self.server = TestServer(self.app, host="127.0.0.1")

    async def __aenter__(self) -> AuthApp:
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.app[SIGNALLING_KEY].close_all()
        await self.session.close()
        await self.server.close()

    def secret(self, name: str) -> str:
        return self.keys[name][1]

    async def request(self, method: str, path: str, credential: str | None = None, **kw):
        headers = kw.pop("headers", {})
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        async with self.session.request(method, self.server.make_url(path), headers=headers, **kw) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text.startswith("{") else text), r.headers


# ------------------------------------------------------------------ no server
def test_scope_table_and_loopback_default(config):
    expected = {"/offer": "calls", "/v1/call-tokens": "calls", "/ws": "calls", "/ws/call": "calls",
                "/v1/chat/completions": "model", "/v1/models": "model", "/v1/usage": "usage",
                "/v1/calls/abc": "admin", "/v1/keys": "admin", "/v1/keys/1": "admin", "/": "",
                "/static/app.js": "", "/healthz": "", "/readyz": "", "/livez": "", "/metrics": "",
                "/webrtc/config": "", "/offerx": "admin", "/v1/modelsx": "admin", "/somewhere": "admin"}
    assert {p: required_scope(p) for p in expected} == expected
    for host, on in (("127.0.0.1", False), ("127.8.9.1", False), ("::1", False), ("localhost", False),
                     ("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("voice.example.com", True)):
        c = copy.deepcopy(config)
        c.server.host = host
        enabled, why = auth_mode(c)
        assert enabled is on and host in why, (host, enabled, why)
    c = copy.deepcopy(config)
    c.auth.required = "on"
    assert auth_mode(c)[0] is True
    c.server.host, c.auth.required = "0.0.0.0", "off"
    assert auth_mode(c)[0] is False


def test_the_source_behind_trusted_proxies():
    import ipaddress
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    def source(peer: str, forwarded: list[str], trusted: list[str]) -> str:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (peer, 1234) if name == "peername" else default
        headers = [("X-Forwarded-For", f) for f in forwarded]
        request = make_mocked_request("GET", "/", headers=CIMultiDict(headers),
                                      transport=transport)
        return client_address(request, [ipaddress.ip_network(t) for t in trusted])

    lb = ["10.0.0.0/8"]
    assert source("203.0.113.9", ["198.51.100.1"], lb) == "203.0.113.9"     # not via a trusted proxy: forged
    assert source("10.0.0.2", ["198.51.100.1"], lb) == "198.51.100.1"
    assert source("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.0.0.7"], lb) == "198.51.100.1"   # the client's own
    assert source("10.0.0.2", ["6.6.6.6", "198.51.100.1"], lb) == "198.51.100.1"           # entry is ignored
    assert source("10.0.0.2", ["not-an-ip"], lb) == "10.0.0.2"
    assert source("10.0.0.2", [], lb) == "10.0.0.2"
    assert source("10.0.0.2", ["198.51.100.1"], []) == "10.0.0.2"


def test_keys_are_stored_hashed_and_checked():
    store = MemoryKeyStore()
    key, secret = new_key("backend", "calls,model")
    store.add_key(key)
    prefix, key_id, random_part = secret.split("_", 2)
    assert prefix == "s300" and key_id == key.id and key_id_of(secret) == key.id
    assert len(random_part) == 43                  # 32 bytes, base64url: 256 bits
    assert key.secret_hash == hash_secret(secret) and secret not in repr(key)
    assert verify_secret(secret, store) == key
    assert verify_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B"), store) is None
    assert verify_secret("s300_nothex0000000000_x", store) is None and key_id_of("sk-abc") is None
    assert key.scopes == frozenset({"calls", "model"})
    for bad in ("calls,root", "", " , "):
        with pytest.raises(BadScopes):
            parse_scopes(bad)
    assert store.revoke_key(key.id, 5.0) and not store.revoke_key(key.id, 6.0)
    assert not store.key_by_id(key.id).active


def test_tokens_expire_on_the_clock_and_are_signed():
    clock = Clock(1_000.0)
    tokens = CallTokens(SECRET, 300, clock)
    minted = tokens.mint("k1")
    claims = jwt.decode(minted.token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "k1" and claims["scope"] == "calls" and claims["exp"] - claims["iat"] == 300
    assert claims["jti"] and minted.expires_at == 1_300.0
    clock.now = 1_299.0
    assert tokens.verify(minted.token).key_id == "k1"
    clock.now = 1_300.0
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(minted.token)
    other = CallTokens(b"another secret of 32 bytes......", 300, clock)
    with pytest.raises(TokenError, match="invalid"):
        other.verify(tokens.mint("k1").token)
    forged = jwt.encode({"sub": "k1", "scope": "admin", "iat": 1, "exp": 10**10, "jti": "x"}, SECRET)
    with pytest.raises(TokenError, match="not a call token"):
        tokens.verify(forged)
    with pytest.raises(ValueError):
        CallTokens.from_config("T", 300, {"T": "short"})


def test_limits_moving_window_and_calls_at_once(config):
    auth = copy.deepcopy(config.auth)
    auth.key_calls_per_minute, auth.source_calls_per_minute = 2, 3
    auth.key_max_concurrent_calls, auth.source_max_concurrent_calls = 0, 1
    limits = Limits(auth)
    first = limits.new_call("k", "10.0.0.1")
    assert not isinstance(first, LimitExceeded) and limits.active("source", "10.0.0.1") == 1
    refused = limits.new_call("k", "10.0.0.1")
    assert isinstance(refused, LimitExceeded) and refused.limit == "source_max_concurrent_calls"
    first.release()
    first.release()   # idempotent
    assert limits.active("source", "10.0.0.1") == 0
    limits.new_call("k", "10.0.0.1").release()
    refused = limits.new_call("k", "10.0.0.2")     # the key's third call this minute, from elsewhere
    assert isinstance(refused, LimitExceeded) and refused.limit == "key_calls_per_minute"
    assert 58 <= refused.retry_after_s <= 60 and "at most 2" in refused.message
    # a refused attempt costs nothing: the source 10.0.0.2 has its 3 calls left without a key
    for _ in range(3):
        assert not isinstance(slot := limits.new_call(None, "10.0.0.2"), LimitExceeded)
        slot.release()
    assert limits.new_call(None, "10.0.0.2").limit == "source_calls_per_minute"
    auth.sip_invites_per_minute = 1
    limits = Limits(auth)
    assert limits.sip_invite("10.0.0.3") is None and limits.sip_invite("10.0.0.3").limit == "sip_invites_per_minute"


def test_turn_rest_api_credentials():
    import base64
    import hashlib
    import hmac

    username, credential = turn_credentials("s3cret", "k1", 3600, now=1_700_000_000.4)
    assert username == "1700003600:k1"
    assert base64.b64decode(credential) == hmac.new(b"s3cret", b"1700003600:k1", hashlib.sha1).digest()


# ------------------------------------------------------------------ over HTTP
async def test_401_403_and_scopes(config):
    async with AuthApp(config) as app:
        status, doc, headers = await app.request("POST", "/offer", data=b"{}")
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="sub300"' and "error" in doc
        status, doc, headers = await app.request("POST", "/offer", "s300_0011223344556677_nope", data=b"{}")
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert doc == {"error": "unknown API key", "code": "invalid_api_key"}
        status, doc, headers = await app.request("POST", "/offer", app.secret("model"), data=b"{}")
        assert status == 403 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
        status, doc, _ = await app.request("GET", "/v1/models", app.secret("caller"))
        assert status == 403 and doc["error"]["type"] == "permission_error"      # OpenAI-shaped under /v1/
        status, doc, _ = await app.request("GET", "/v1/models", app.secret("model"))
        assert status == 200 and doc["object"] == "list"
        status, doc, _ = await app.request("GET", "/v1/models", headers={"Authorization": "Basic eDp5"})
        assert status == 401 and doc["error"]["code"] == "missing_api_key"
        status, _, _ = await app.request("POST", "/offer", app.secret("caller"), data=b"{}")
        assert status == 400                                              # past auth: the offer itself is bad
        for path in ("/", "/static/app.js", "/healthz", "/readyz", "/metrics", "/webrtc/config"):
            assert (await app.request("GET", path))[0] == 200, path
        status, doc, _ = await app.request("GET", "/webrtc/config")
        assert doc["auth"] == {"required": True, "authenticated": False}
        assert (await app.request("GET", "/nowhere"))[0] == 404
        status, doc, _ = await app.request("GET", "/v1/keys", app.secret("admin"))
        assert status == 200 and {k["name"] for k in doc["keys"]} == {"caller", "model", "admin"}
        assert all("secret" not in k and "secret_hash" not in k for k in doc["keys"])
        assert (await app.request("GET", "/v1/keys", app.secret("caller")))[0] == 403


async def test_call_tokens_flow_expiry_and_revocation(config, seed_sdp):
    async with AuthApp(config) as app:
        status, minted, _ = await app.request("POST", "/v1/call-tokens", app.secret("caller"))
        caller = app.keys["caller"][0]
        assert status == 200 and minted["key_id"] == caller.id
        assert minted["expires_at"] == app.wall.now + config.auth.call_token_ttl_s
        token = minted["token"]
        assert (await app.request("POST", "/v1/call-tokens", token))[0] == 403   # a token mints no token
        assert (await app.request("GET", "/v1/models", token))[0] == 403          # a token only starts calls
        assert (await app.request("POST", "/v1/call-tokens", app.secret("model")))[0] == 403
        # the page's way: ?token=, and a real offer is answered; the call is the key's
        status, answer, _ = await app.request("POST", f"/offer?token={token}", data=body(seed_sdp))
        assert status == 200, answer
        context = app.recorder.contexts[answer["call_id"]]
        assert (context.key_id, context.source, context.record_audio) == (caller.id, "127.0.0.1", True)
        # an API key never rides in a URL
        status, doc, _ = await app.request("POST", f"/offer?token={app.secret('caller')}", data=b"{}")
        assert status == 401 and "URL" in doc["error"]
        # expiry, on the tokens' clock
        app.wall.now += config.auth.call_token_ttl_s
        status, doc, _ = await app.request("POST", "/offer", token, data=b"{}")
        assert status == 401 and doc["error"] == "call token expired"
        app.wall.now -= 10
        assert (await app.request("POST", "/offer", token, data=b"{}"))[0] == 400
        # revoked through the admin route: at once in this process
        status, doc, _ = await app.request("DELETE", f"/v1/keys/{caller.id}", app.secret("admin"))
        assert status == 200 and doc == {"id": caller.id, "revoked": True}
        status, doc, _ = await app.request("POST", "/offer", token, data=b"{}")
        assert status == 401 and "revoked" in doc["error"]
        status, doc, _ = await app.request("POST", "/offer", app.secret("caller"), data=b"{}")
        assert status == 401 and doc["error"] == "API key revoked"
        assert (await app.request("DELETE", f"/v1/keys/{caller.id}", app.secret("admin")))[0] == 404


async def test_a_key_revoked_elsewhere_stops_within_the_cache_ttl(config):
    async with AuthApp(config) as app:
        model = app.keys["model"][0]
        assert (await app.request("GET", "/v1/models", app.secret("model")))[0] == 200
        app.store.revoke_key(model.id, 0.0)                 # `sub300 keys revoke` in another process
        app.mono.now += KEY_CACHE_TTL_S - 0.1
        assert (await app.request("GET", "/v1/models", app.secret("model")))[0] == 200   # cached
        app.mono.now += 0.2
        assert (await app.request("GET", "/v1/models", app.secret("model")))[0] == 401


async def test_keys_created_over_the_admin_route_work(config):
    async with AuthApp(config) as app:
        status, created, _ = await app.request("POST", "/v1/keys", app.secret("admin"),
                                               json={"name": "b2", "scopes": ["model"]})
        assert status == 201 and created["secret"].startswith("s300_") and created["scopes"] == ["model"]
        assert (await app.request("GET", "/v1/models", created["secret"]))[0] == 200
        status, doc, _ = await app.request("POST", "/v1/keys", app.secret("admin"), json={"name": "x", "scopes": ["root"]})
        assert status == 400 and "root" in doc["error"]["message"]


async def test_429_with_retry_after_per_key_and_per_source(config, seed_sdp):
    limits = {"key_calls_per_minute": 2, "key_max_concurrent_calls": 1, "key_model_requests_per_minute": 1,
              "source_model_requests_per_minute": 0}
    async with AuthApp(config, auth=limits) as app:
        key = app.secret("caller")
        status, answer, _ = await app.request("POST", "/offer", key, data=body(seed_sdp))
        assert status == 200
        status, doc, headers = await app.request("POST", "/offer", key, data=body(seed_sdp))
        assert status == 429 and doc["limit"] == "key_max_concurrent_calls" and headers["Retry-After"] == "5"
        await app.app[SIGNALLING_KEY].close_all()         # the call ends: its slot comes back
        assert app.state.limits.active("key", app.keys["caller"][0].id) == 0
        assert (await app.request("POST", "/offer", key, data=b"{}"))[0] == 400     # the 2nd this minute
        status, doc, headers = await app.request("POST", "/offer", key, data=b"{}")
        assert status == 429 and doc["limit"] == "key_calls_per_minute"
        assert 1 <= int(headers["Retry-After"]) <= 60 and doc["retry_after_s"] == int(headers["Retry-After"])
        assert app.state.limits.active("key", app.keys["caller"][0].id) == 0   # refused and 400s hold nothing
        request = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (await app.request("POST", "/v1/chat/completions", app.secret("model"), json=request))[0] == 200
        status, doc, headers = await app.request("POST", "/v1/chat/completions", app.secret("model"), json=request)
        assert status == 429 and doc["error"]["limit"] == "key_model_requests_per_minute" and "Retry-After" in headers
    async with AuthApp(config, enabled=False, auth={"source_calls_per_minute": 1}) as app:   # auth off
        assert (await app.request("POST", "/offer", data=b"{}"))[0] == 400
        status, doc, _ = await app.request("POST", "/offer", data=b"{}")
        assert status == 429 and doc["limit"] == "source_calls_per_minute"
        status, doc, _ = await app.request("POST", "/v1/call-tokens")
        assert status == 400 and "off" in doc["error"]["message"]
        status, doc, _ = await app.request("POST", "/v1/call-tokens", app.secret("caller"))   # the backend's
        assert status == 200 and doc["key_id"] == app.keys["caller"][0].id                  # code still works
        assert (await app.request("POST", "/v1/call-tokens", app.secret("model")))[0] == 403
        status, doc, _ = await app.request("GET", "/webrtc/config")
        assert doc["auth"] == {"required": False, "authenticated": False}


async def test_with_authentication_off_a_valid_credential_still_names_its_key(config, seed_sdp):
    """A backend on a loopback development server: its calls and model requests are attributed as in production;
    a bad credential is ignored (logged), not refused."""
    async with AuthApp(config, enabled=False) as app:
        caller = app.keys["caller"][0]
        status, minted, _ = await app.request("POST", "/v1/call-tokens", app.secret("caller"))
        status, answer, _ = await app.request("POST", f"/offer?token={minted['token']}", data=body(seed_sdp))
        assert status == 200, answer
        assert app.recorder.contexts[answer["call_id"]].key_id == caller.id
        status, answer, _ = await app.request("POST", "/offer", app.secret("caller"), data=body(seed_sdp))
        assert status == 200 and app.recorder.contexts[answer["call_id"]].key_id == caller.id
        status, answer, _ = await app.request("POST", "/offer", "s300_not_a_key", data=body(seed_sdp))
        assert status == 200 and app.recorder.contexts[answer["call_id"]].key_id is None


async def test_page_turn_credentials(config):
    webrtc = {"turn_urls": ["turn:127.0.0.1:3478"], "stun_urls": ["stun:127.0.0.1:3478"], "turn_username": "static",
              "turn_credential_ttl_s": 600}
    environ = {"SUB300_TURN_SECRET": "turn-shared-secret", "SUB300_TURN_CREDENTIAL": "long-lived"}
    async with AuthApp(config, webrtc=webrtc, environ=environ) as app:
        status, doc, _ = await app.request("GET", "/webrtc/config")
        assert doc["iceServers"] == [{"urls": ["stun:127.0.0.1:3478"]}]      # no relay for strangers
        status, minted, _ = await app.request("POST", "/v1/call-tokens", app.secret("caller"))
        status, doc, _ = await app.request("GET", f"/webrtc/config?token={minted['token']}")
        turn = doc["iceServers"][1]
        expiry, user = turn["username"].split(":")
        assert user == app.keys["caller"][0].id and 590 <= int(expiry) - time.time() <= 600
        assert turn["credential"] == turn_credentials("turn-shared-secret", user, 0, int(expiry))[1]
        assert "long-lived" not in json.dumps(doc) and doc["auth"]["authenticated"] is True
    async with AuthApp(config, enabled=False, webrtc=webrtc, environ=environ) as app:
        status, doc, _ = await app.request("GET", "/webrtc/config")
        assert doc["iceServers"][1]["username"].endswith(":anon")
    static = {"SUB300_TURN_CREDENTIAL": "long-lived"}   # no shared secret: the static password, to callers only
    async with AuthApp(config, webrtc=webrtc, environ=static) as app:
        assert (await app.request("GET", "/webrtc/config"))[1]["iceServers"] == [{"urls": ["stun:127.0.0.1:3478"]}]
        status, minted, _ = await app.request("POST", "/v1/call-tokens", app.secret("caller"))
        status, doc, _ = await app.request("GET", "/webrtc/config", minted["token"])
        assert doc["iceServers"][1] == {"urls": ["turn:127.0.0.1:3478"], "username": "static",
                                        "credential": "long-lived"}


@pytest.fixture(scope="module")
def seed_sdp() -> str:
    return asyncio.run(seed_offer())
