"""SIP protocol behaviour against a scripted client: what sipp scenarios cannot easily send.

Malformed and truncated messages (400 where a response is possible, the
server answers the next INVITE), retransmissions both ways, OPTIONS,
re-INVITE, an INVITE without SDP, DTMF (RFC 4733 and SIP INFO), the call
limit (503), the source allow-list (403), digest authentication (401) and a
call factory that fails (500).

No model is loaded: each call's agent is `EchoAgent` (a fake that plays the
caller back), so these tests take about as long as their SIP timers.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import re
import struct

import pytest

from sub300.media.sip.dtmf import DtmfReceived

from .test_sip_support import echo_calls, sip_service

SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio {port} RTP/AVP {fmts}\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
       "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\n")


class Client(asyncio.DatagramProtocol):
    """A bare UDP SIP client: sends text, collects what comes back."""

    def __init__(self):
        self.inbox: asyncio.Queue[str] = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.inbox.put_nowait(data.decode("utf-8", "replace"))

    @classmethod
    async def open(cls, server):
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        client.transport, client.server = transport, server
        client.port = transport.get_extra_info("sockname")[1]
        return client

    def send(self, text: str | bytes):
        self.transport.sendto(text.encode() if isinstance(text, str) else text, self.server)

    async def expect(self, status: int, timeout: float = 5.0, method: str | None = None) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await asyncio.wait_for(self.inbox.get(), timeout=max(left, 0.01))
            first = message.split("\r\n", 1)[0]
            if method is not None and first.startswith(method + " "):
                return message
            if first.startswith(f"SIP/2.0 {status} "):
                return message
            if method is None and first.startswith("SIP/2.0 1") and status >= 200:
                continue   # provisional responses on the way
            if method is not None and first.startswith("SIP/2.0"):
                continue
            raise AssertionError(f"expected {status or method}, got:\n{message}")

    async def silent(self, seconds: float) -> list[str]:
        await asyncio.sleep(seconds)
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def close(self):
        self.transport.close()


def header(message: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(.*)$", message, re.MULTILINE | re.IGNORECASE)
    assert match, f"no {name} in\n{message}"
    return match.group(1).strip()


def invite(client, *, call_id="c1", branch="z9hG4bK-1", cseq=1, body: str | None = None, to_tag="",
           rtp_port=40000, fmts="0 8 101", extra="") -> str:
    body = SDP.format(port=rtp_port, fmts=fmts) if body is None else body
    return (f"INVITE sip:agent@127.0.0.1:{client.server[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{client.port};branch={branch};rport\r\n"
            f"From: <sip:t@127.0.0.1>;tag=ft\r\nTo: <sip:agent@127.0.0.1>{to_tag}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:t@127.0.0.1:{client.port}>\r\n"
            f"Max-Forwards: 70\r\n{extra}" + ("Content-Type: application/sdp\r\n" if body else "")
            + f"Content-Length: {len(body)}\r\n\r\n{body}")


def in_dialog(client, method, ok: str, cseq: int, *, branch=None, body="", ctype="") -> str:
    to = header(ok, "To")
    return (f"{method} sip:agent@127.0.0.1:{client.server[1]} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{client.port};branch={branch or 'z9hG4bK-' + method + str(cseq)};rport\r\n"
            f"From: <sip:t@127.0.0.1>;tag=ft\r\nTo: {to}\r\nCall-ID: {header(ok, 'Call-ID')}\r\n"
            f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "")
            + f"Content-Length: {len(body)}\r\n\r\n{body}")


async def call(client, **kw) -> str:
    client.send(invite(client, **kw))
    ok = await client.expect(200, timeout=10)
    client.send(in_dialog(client, "ACK", ok, kw.get("cseq", 1)))
    return ok


async def hang_up(client, ok, cseq=5):
    client.send(in_dialog(client, "BYE", ok, cseq))
    await client.expect(200)


async def test_options_garbage_and_truncated_messages_then_a_call(config):
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        client.send(f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{client.port};branch=z9hG4bK-o\r\n"
                    "From: <sip:t@x>;tag=1\r\nTo: <sip:agent@x>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        assert "INVITE" in header(await client.expect(200), "Allow")
        rng = random.Random(4)
        for _ in range(20):
            client.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))))
        client.send(b"\x00\xff\xfe not sip at all\r\n\r\n")
        client.send("SIP/2.0 200 OK\r\n\r\n")                      # a stray response
        full = invite(client, call_id="trunc", branch="z9hG4bK-t")
        client.send(full[: full.index("Content-Length")])          # cut inside the headers
        assert "Bad Request" in (await client.expect(400)).split("\r\n")[0]
        client.send(full[:-40])                                     # body shorter than Content-Length
        await client.expect(400)
        client.send(full.replace("CSeq: 1 INVITE", "CSeq: x INVITE").replace("z9hG4bK-t", "z9hG4bK-t2"))
        await client.expect(400)
        client.send(full.replace("Via: SIP/2.0/UDP", "Via: garbage").replace("z9hG4bK-t", "z9hG4bK-t3"))
        assert await client.silent(0.3) == []                       # no usable Via: nowhere to answer
        assert service.uas.malformed >= 20
        ok = await call(client)                                    # and the server still takes a call
        assert header(ok, "Content-Type") == "application/sdp"
        await hang_up(client, ok)
        client.close()
        assert (await observer.wait_ended())[0].ended == "caller hung up"


@pytest.mark.slow   # RFC 3261 timers on the wall clock (2 s): the fast tier stays under 30 s
async def test_retransmissions_reinvite_and_dtmf(config):
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client))
        ok = await client.expect(200, timeout=10)
        client.send(invite(client))                                 # the INVITE again: same 200 again
        assert (await client.expect(200)).split("\r\n\r\n")[0] == ok.split("\r\n\r\n")[0]
        again = await client.expect(200, timeout=2)                 # no ACK yet: the server resends its 200
        assert header(again, "Call-ID") == "c1"
        client.send(in_dialog(client, "ACK", ok, 1))
        leftovers = await client.silent(1.2)                        # ACKed: retransmissions stop
        assert not [m for m in leftovers if m.startswith("SIP/2.0 200")], leftovers
        assert "rport=" in header(ok, "Via") and "received=127.0.0.1" in header(ok, "Via")

        # RTP: where does the agent send, and where do we send to?
        rtp_port = int(re.search(r"m=audio (\d+)", ok).group(1))
        loop = asyncio.get_running_loop()
        media = asyncio.Queue()

        class Media(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                media.put_nowait(data)

        rtp, _ = await loop.create_datagram_endpoint(Media, local_addr=("127.0.0.1", 0))
        my_rtp = rtp.get_extra_info("sockname")[1]
        # re-INVITE moving our media to a new port: the agent must follow
        client.send(invite(client, branch="z9hG4bK-re", cseq=2, to_tag=";tag=" + header(ok, "To").split("tag=")[1],
                           rtp_port=my_rtp))
        ok2 = await client.expect(200)
        client.send(in_dialog(client, "ACK", ok2, 2))
        packet = await asyncio.wait_for(media.get(), 2)
        assert packet[1] & 0x7F == 0                                # PCMU
        # DTMF: RFC 4733 events for "1", "#" (each sent 3 times as an end packet), then INFO "5"
        for seq, (event, ts) in enumerate([(1, 1000), (1, 1000), (1, 1000), (11, 2000), (11, 2000)]):
            payload = struct.pack("!BBH", event, 0x80 | 10, 800)
            rtp.sendto(struct.pack("!BBHII", 0x80, 101, seq, ts, 1234) + payload, ("127.0.0.1", rtp_port))
        await asyncio.sleep(0.1)   # RTP and SIP are two sockets: keep their order
        client.send(in_dialog(client, "INFO", ok, 3, body="Signal=5\r\nDuration=160\r\n",
                              ctype="application/dtmf-relay"))
        await client.expect(200)
        await asyncio.sleep(0.2)
        await hang_up(client, ok, 6)
        (record,) = await observer.wait_ended()
        digits = [(e.digit, e.source) for e in record.events if isinstance(e, DtmfReceived)]
        assert digits == [("1", "rfc4733"), ("#", "rfc4733"), ("5", "info")], digits
        assert service.uas.ended_calls[-1]["digits"] == "1#5"
        rtp.close()
        client.close()


async def test_invite_without_sdp_gets_an_offer(config):
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client, body=""))
        ok = await client.expect(200, timeout=10)
        assert "m=audio" in ok and "PCMU/8000" in ok
        answer = SDP.format(port=40002, fmts="8").replace("a=rtpmap:0 PCMU/8000\r\n", "")
        client.send(in_dialog(client, "ACK", ok, 1, body=answer, ctype="application/sdp"))
        await asyncio.sleep(0.2)
        (dialog,) = service.uas.dialogs.values()
        assert dialog.call.endpoint.params.codec == "PCMA" and dialog.call.endpoint.params.remote_port == 40002
        await hang_up(client, ok)
        client.close()


async def test_call_limit_allow_list_and_unknown_transactions(config):
    async with sip_service(config, call_factory=echo_calls, sip={"max_calls": 1}) as (service, observer):
        client = await Client.open(service.address)
        ok = await call(client)
        client.send(invite(client, call_id="c2", branch="z9hG4bK-2"))
        assert header(await client.expect(503), "Retry-After")
        client.send(in_dialog(client, "ACK", ok, 1, branch="z9hG4bK-2"))
        client.send(in_dialog(client, "BYE", ok, 3).replace("Call-ID: c1", "Call-ID: nope"))
        await client.expect(481)
        await hang_up(client, ok)
        client.close()
    async with sip_service(config, call_factory=echo_calls,
                           sip={"allowed_sources": ["10.0.0.0/8"]}) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client))
        await client.expect(403)
        client.close()
        assert observer.calls == {}


async def test_digest_authentication(config, monkeypatch):
    monkeypatch.setenv("SUB300_TEST_SIP_PASSWORD", "s3cret")
    settings = {"auth_username": "gw", "auth_password_env": "SUB300_TEST_SIP_PASSWORD", "realm": "sub300"}
    async with sip_service(config, call_factory=echo_calls, sip=settings) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client))
        challenge = header(await client.expect(401), "WWW-Authenticate")
        nonce = re.search(r'nonce="([^"]+)"', challenge).group(1)
        client.send(in_dialog(client, "ACK", await asyncio.sleep(0, "To: <sip:agent@127.0.0.1>\r\nCall-ID: c1"), 1,
                              branch="z9hG4bK-1"))
        uri = f"sip:agent@127.0.0.1:{service.address[1]}"

        def md5(s):
            return hashlib.md5(s.encode()).hexdigest()

        def authorization(password):
            ha1, ha2 = md5(f"gw:sub300:{password}"), md5(f"INVITE:{uri}")
            response = md5(f"{ha1}:{nonce}:00000001:abc:auth:{ha2}")
            return (f'Authorization: Digest username="gw", realm="sub300", nonce="{nonce}", uri="{uri}", '
                    f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="abc"\r\n')

        client.send(invite(client, branch="z9hG4bK-bad", cseq=2, extra=authorization("wrong")))
        await client.expect(403)
        client.send(invite(client, branch="z9hG4bK-good", cseq=3, extra=authorization("s3cret")))
        ok = await client.expect(200, timeout=10)
        client.send(in_dialog(client, "ACK", ok, 3))
        await hang_up(client, ok, 7)
        client.close()


async def test_a_call_factory_that_fails_gets_500_and_the_server_goes_on(config):
    def broken(setup):
        raise RuntimeError("no agent today")

    async with sip_service(config, call_factory=broken) as (service, observer):
        client = await Client.open(service.address)
        client.send(invite(client))
        refused = await client.expect(500, timeout=5)
        client.send(in_dialog(client, "ACK", refused, 1, branch="z9hG4bK-1"))   # same branch as the INVITE
        assert await client.silent(0.7) == []                      # ACKed: no retransmission of the 500
        assert observer.calls == {} and service.active_calls == 0
        assert service.uas.ended_calls[-1]["reason"] == "set-up failed"
        client.close()
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        ok = await call(client)
        await hang_up(client, ok)
        client.close()
        assert (await observer.wait_ended())[0].ended == "caller hung up"


async def test_options_over_tcp_and_closing_with_a_connection_open(config):
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        reader, writer = await asyncio.open_connection(*service.address)
        writer.write(b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-tcp\r\n"
                     b"From: <sip:t@x>;tag=1\r\nTo: <sip:agent@x>\r\nCall-ID: tcp1\r\nCSeq: 1 OPTIONS\r\n"
                     b"Content-Length: 0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"SIP/2.0 200 ") and b"Allow: " in head
        assert len(service.transport.connections) == 1
    assert len(service.transport.connections) == 0            # the service closed the connection's task
    assert await asyncio.wait_for(reader.read(), 5) == b""     # and the connection
    writer.close()
