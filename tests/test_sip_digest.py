"""Digest authentication against replay (issue 9, kind 9): nonces are tracked with their nonce-count, expire, and are
bounded in number; a replayed or stale one gets a fresh challenge with ``stale=true`` (RFC 7616 §3.3, §3.4).

Unit tests drive `DigestAuth` with a fake clock; the protocol test runs the SIP service with `EchoAgent` (a fake
agent, no model) and replays a captured ``Authorization`` for new calls.
"""
from __future__ import annotations

import asyncio
import hashlib
import re

from sub300.media.sip.auth import DigestAuth

from .test_sip_protocol import Client, hang_up, header, in_dialog, invite
from .test_sip_support import echo_calls, sip_service

URI = "sip:agent@127.0.0.1"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def nonce_of(challenge: str) -> str:
    match = re.search(r'nonce="([^"]+)"', challenge)
    assert match, challenge
    return match.group(1)


def authorization(nonce: str, *, password: str = "s3cret", nc: int = 1, cnonce: str = "abc", uri: str = URI,
                  qop: bool = True) -> str:
    """An Authorization value as a UAC computes it (RFC 7616 §3.4.1, MD5)."""
    ha1, ha2 = md5(f"gw:sub300:{password}"), md5(f"INVITE:{uri}")
    if not qop:
        return (f'Digest username="gw", realm="sub300", nonce="{nonce}", uri="{uri}", '
                f'response="{md5(f"{ha1}:{nonce}:{ha2}")}", algorithm=MD5')
    response = md5(f"{ha1}:{nonce}:{nc:08x}:{cnonce}:auth:{ha2}")
    return (f'Digest username="gw", realm="sub300", nonce="{nonce}", uri="{uri}", response="{response}", '
            f'algorithm=MD5, qop=auth, nc={nc:08x}, cnonce="{cnonce}"')


class FakeClock:
    """A fake clock (seconds) the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nonce_count_must_increase_and_a_replay_is_stale():
    auth = DigestAuth("gw", "s3cret", "sub300", clock=FakeClock())
    nonce = nonce_of(auth.challenge())
    first = authorization(nonce, nc=1)
    assert auth.check(first, "INVITE") == "ok"
    assert auth.check(first, "INVITE") == "stale"                    # the same header again: a replay
    assert auth.check(authorization(nonce, nc=3, cnonce="x"), "INVITE") == "ok"   # a later nc is fine (RFC 7616)
    assert auth.check(authorization(nonce, nc=2, cnonce="y"), "INVITE") == "stale"   # an earlier nc is not
    assert auth.check(authorization(nonce, nc=3, cnonce="x"), "INVITE") == "stale"
    assert auth.check(authorization(nonce, nc=4, password="wrong"), "INVITE") == "bad"
    assert auth.check(authorization(nonce, nc=4), "BYE") == "bad"    # the method is part of the response
    assert auth.check(None, "INVITE") == "missing"


def test_without_qop_a_nonce_is_single_use():
    auth = DigestAuth("gw", "s3cret", "sub300", clock=FakeClock())
    nonce = nonce_of(auth.challenge())
    assert auth.check(authorization(nonce, qop=False), "INVITE") == "ok"
    assert auth.check(authorization(nonce, qop=False), "INVITE") == "stale"


def test_nonces_expire_and_unknown_ones_are_stale_or_bad():
    clock = FakeClock()
    auth = DigestAuth("gw", "s3cret", "sub300", ttl_s=30.0, clock=clock)
    nonce = nonce_of(auth.challenge())
    clock.now += 30.5
    assert auth.check(authorization(nonce), "INVITE") == "stale"
    fresh = auth.challenge(stale=True)
    assert "stale=true" in fresh and nonce_of(fresh) != nonce
    assert auth.check(authorization(nonce_of(fresh)), "INVITE") == "ok"
    assert auth.check(authorization("f" * 32), "INVITE") == "stale"            # right password, nonce never issued
    assert auth.check(authorization("f" * 32, password="x"), "INVITE") == "bad"
    other = DigestAuth("gw", "s3cret", "sub300", clock=clock)                   # another process (a restart)
    assert other.check(authorization(nonce_of(auth.challenge())), "INVITE") == "stale"


def test_nonce_memory_is_bounded():
    auth = DigestAuth("gw", "s3cret", "sub300", max_nonces=16, clock=FakeClock())
    first = nonce_of(auth.challenge())
    for _ in range(1000):                                                      # a flood of unauthenticated INVITEs
        auth.challenge()
    assert auth.nonces <= 16
    assert auth.check(authorization(first), "INVITE") == "stale"              # pushed out: the caller retries
    assert auth.check(authorization(nonce_of(auth.challenge())), "INVITE") == "ok"


def test_malformed_credentials_are_bad_not_errors():
    auth = DigestAuth("gw", "s3cret", "sub300", clock=FakeClock())
    nonce = nonce_of(auth.challenge())
    good = authorization(nonce)
    for value in ["Digest", "Basic Z3c6czNjcmV0", "garbage", good.replace("nc=00000001", "nc=zz"),
                  good.replace("nc=00000001", "nc=1"), good.replace("algorithm=MD5", "algorithm=SHA-256"),
                  good.replace('cnonce="abc"', ""), good.replace("qop=auth", "qop=auth-int"), "Digest ,,,=",
                  good.replace('username="gw"', 'username="root"'), good.replace('realm="sub300"', 'realm="x"')]:
        assert auth.check(value, "INVITE") == "bad", value
    assert auth.check(good, "INVITE") == "ok"                                  # none of them used the nonce up


async def test_a_captured_authorization_places_no_second_call(config, monkeypatch):
    monkeypatch.setenv("SUB300_TEST_SIP_PASSWORD", "s3cret")
    settings = {"auth_username": "gw", "auth_password_env": "SUB300_TEST_SIP_PASSWORD", "realm": "sub300",
                "nonce_ttl_s": 1.0}
    async with sip_service(config, call_factory=echo_calls, sip=settings) as (service, observer):
        client = await Client.open(service.address)
        uri = f"sip:agent@127.0.0.1:{service.address[1]}"

        async def attempt(n: int, credentials: str | None, status: int) -> str:
            """An INVITE of a new call (own Call-ID and branch), with ``credentials``; ACK an error answer."""
            extra = f"Authorization: {credentials}\r\n" if credentials else ""
            client.send(invite(client, call_id=f"d{n}", branch=f"z9hG4bK-d{n}", extra=extra))
            answer = await client.expect(status, timeout=10)
            if status >= 300:
                client.send(in_dialog(client, "ACK", answer, 1, branch=f"z9hG4bK-d{n}"))
            return answer

        nonce = nonce_of(header(await attempt(1, None, 401), "WWW-Authenticate"))
        captured = authorization(nonce, uri=uri)
        ok = await attempt(2, captured, 200)                                  # the real caller
        client.send(in_dialog(client, "ACK", ok, 1))
        for n in (3, 4, 5):                                                   # the eavesdropper, three times
            again = header(await attempt(n, captured, 401), "WWW-Authenticate")
            assert "stale=true" in again and nonce_of(again) != nonce
        assert service.active_calls == 1
        fresh = nonce_of(again)                                               # the real caller answers the challenge
        ok2 = await attempt(6, authorization(fresh, uri=uri, cnonce="c6"), 200)
        client.send(in_dialog(client, "ACK", ok2, 1))
        assert service.active_calls == 2

        expiring = nonce_of(header(await attempt(7, None, 401), "WWW-Authenticate"))
        await asyncio.sleep(1.3)                                              # past sip.nonce_ttl_s
        stale = header(await attempt(8, authorization(expiring, uri=uri), 401), "WWW-Authenticate")
        assert "stale=true" in stale
        ok3 = await attempt(9, authorization(nonce_of(stale), uri=uri), 200)
        client.send(in_dialog(client, "ACK", ok3, 1))
        assert service.active_calls == 3
        await attempt(10, authorization(nonce_of(stale), uri=uri, password="wrong", nc=2), 403)
        for cseq, answer in enumerate((ok, ok2, ok3), start=5):
            await hang_up(client, answer, cseq)
        await observer.wait_ended(3)
        client.close()
