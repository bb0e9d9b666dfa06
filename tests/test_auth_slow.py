"""Who may call, end to end (slow tier): a real coturn takes minted TURN credentials and refuses bad ones;
a real aiortc call with a call token is answered by the real engines and attributed to its key.

coturn (`turnserver`, Debian package coturn) runs on 127.0.0.1 with ``use-auth-secret`` and a
``static-auth-secret`` — the TURN REST API scheme (agent/auth/turn.py) — started and stopped by its PID.
The TURN client is aioice's, the one aiortc uses.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aioice.stun import TransactionFailed
from aioice.turn import create_turn_endpoint

from sub300.agent.auth.keys import new_key
from sub300.agent.auth.memory_store import MemoryKeyStore
from sub300.agent.auth.tokens import CallTokens
from sub300.agent.auth.turn import turn_credentials
from sub300.agent.calls import ObserverGroup
from sub300.testing.aiortc_caller import AiortcCaller
from sub300.web.auth import add_auth_routes
from sub300.web.server import SIGNALLING_KEY, build_app

from .speech import compose, speak
from .test_auth import ContextRecorder
from .test_sip_support import Peer

pytestmark = pytest.mark.slow
TURN_SECRET = "coturn-shared-secret-for-tests"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nothing(asyncio.DatagramProtocol):
    pass


async def allocate(port: int, username: str, credential: str) -> tuple[str, int]:
    """A TURN allocation on 127.0.0.1:port (aioice); returns the relayed address, or raises."""
    transport, _ = await asyncio.wait_for(
        create_turn_endpoint(Nothing, ("127.0.0.1", port), username, credential), 10)
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn (turnserver) is not installed")
async def test_coturn_accepts_minted_credentials_and_refuses_wrong_or_expired(tmp_path):
    port = free_udp_port()
    conf = tmp_path / "turnserver.conf"
    conf.write_text("\n".join([
        "listening-ip=127.0.0.1", "relay-ip=127.0.0.1", f"listening-port={port}",
        "use-auth-secret", f"static-auth-secret={TURN_SECRET}", "realm=sub300.test",
        "no-tls", "no-dtls", "no-cli", "fingerprint", f"userdb={tmp_path / 'turndb'}",
        f"pidfile={tmp_path / 'turn.pid'}", "log-file=stdout", "simple-log", ""]))
    coturn = Peer(["turnserver", "-c", str(conf)], log_path=str(tmp_path / "turnserver.log"))
    try:
        now = time.time()
        good = turn_credentials(TURN_SECRET, "k1", 3600, now)
        deadline = time.monotonic() + 15
        while True:   # until coturn listens
            try:
                relayed = await allocate(port, *good)
                break
            except (OSError, ConnectionError, TransactionFailed, TimeoutError):
                if time.monotonic() > deadline or coturn.proc.poll() is not None:
                    raise AssertionError(f"coturn did not allocate: {coturn.tail()}") from None
                await asyncio.sleep(0.2)
        assert relayed[0] == "127.0.0.1"
        anonymous = turn_credentials(TURN_SECRET, "anon", 60, now)
        assert (await allocate(port, *anonymous))[0] == "127.0.0.1"
        for label, (username, credential) in {
            "wrong secret": turn_credentials("not-the-secret", "k1", 3600, now),
            "expired": turn_credentials(TURN_SECRET, "k1", 3600, now - 7200),
            "tampered user": (good[0].replace(":k1", ":k2"), good[1]),
        }.items():
            with pytest.raises(TransactionFailed, match="401"):
                await allocate(port, username, credential)
            assert coturn.proc.poll() is None, label
    finally:
        coturn.stop()


def app_with_a_calls_key(config, engines):
    """The web app under authentication with one "calls" key: (app, key, secret, the calls' contexts)."""
    store = MemoryKeyStore()
    key, secret = new_key("backend", "calls")
    store.add_key(key)
    app = build_app(config, engines)
    recorder = ContextRecorder()
    signalling = app[SIGNALLING_KEY]
    signalling.observer = ObserverGroup([signalling.observer, recorder])
    add_auth_routes(app, config, store, enabled=True, tokens=CallTokens(b"t" * 32, 300), environ={})
    return app, key, secret, recorder


async def test_a_real_call_with_a_call_token(config, engines):
    app, key, secret, recorder = app_with_a_calls_key(config, engines)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as backend:
            async with backend.post(base + "/v1/call-tokens", headers={"Authorization": f"Bearer {secret}"}) as r:
                assert r.status == 200
                token = (await r.json())["token"]
            with pytest.raises(ConnectionError, match="401"):   # no token: no call
                await AiortcCaller(base, backend).connect()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as page:
            caller = AiortcCaller(base, page)
            await caller.connect()
            caller.say(compose(0.8, speak("What is the capital of France?"), 1.2))
            (turn,) = await caller.wait_for_turns(1, 90)
            assert turn["ledger"]["voice_to_voice_ms"] > 0
            context = recorder.contexts[caller.call_id]
            assert (context.key_id, context.source) == (key.id, "127.0.0.1")
            await caller.hang_up()
    finally:
        await app[SIGNALLING_KEY].close_all()
        await server.close()


@pytest.mark.skipif(not shutil.which("chromium") and not __import__("os").path.exists("/usr/bin/chromium"),
                    reason="Debian chromium is not installed")
async def test_the_demo_page_with_and_without_a_call_token(config):
    """Headless Chromium on the page (fake engines, authentication on): no token → a clear message and no
    Call button; a bad token → 'not accepted'; a minted token → the page's /offer carries it (the call is
    the key's)."""
    from playwright.async_api import async_playwright

    from sub300.testing.fakes import fake_engines

    from .browser_calls import CHROMIUM, CHROMIUM_FLAGS

    app, key, secret, recorder = app_with_a_calls_key(config, fake_engines())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    ready = "() => window.sub300 && window.sub300.ready"
    try:
        async with aiohttp.ClientSession() as backend, \
                backend.post(base + "/v1/call-tokens", headers={"Authorization": f"Bearer {secret}"}) as r:
            token = (await r.json())["token"]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = await browser.new_page()
                await page.goto(base + "/")
                await page.wait_for_function(ready, timeout=15_000)
                assert "requires a call token" in await page.inner_text("#auth-needed")
                assert await page.is_disabled("#call") and await page.inner_text("#status") == "token needed"
                await page.goto(base + "/?token=eyJhbGciOiJIUzI1NiJ9.e30.bad")
                await page.wait_for_function(ready, timeout=15_000)
                assert "not accepted" in await page.inner_text("#auth-needed")
                await page.goto(base + f"/?aec=0&token={token}")
                await page.wait_for_function(ready, timeout=15_000)
                assert await page.evaluate("() => window.sub300.auth") == {"required": True, "authenticated": True}
                assert not await page.is_disabled("#call") and await page.query_selector("#auth-needed") is None
                assert "token=" not in page.url and "aec=0" in page.url   # out of the address bar and history
                await page.goto(base + f"/?x=1#token={token}")          # the fragment form: never sent to the server
                await page.wait_for_function(ready, timeout=15_000)
                assert await page.evaluate("() => window.sub300.auth.authenticated") and "token" not in page.url
                await page.goto(base + f"/?aec=0&token={token}")
                await page.wait_for_function(ready, timeout=15_000)
                await page.click("#call")
                await page.wait_for_function("() => window.sub300.callId || window.sub300.error", timeout=20_000)
                call_id = await page.evaluate("() => window.sub300.callId")
                assert call_id, await page.evaluate("() => window.sub300.error")
                assert recorder.contexts[call_id].key_id == key.id
            finally:
                await browser.close()
    finally:
        await app[SIGNALLING_KEY].close_all()
        await server.close()
