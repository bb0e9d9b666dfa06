"""The SIP edge under abuse (issue 9, kinds 8 and 10): held-open TCP connections, connection caps, the allow-list at
accept, oversized messages, and a fuzz of malformed INVITEs over UDP and TCP.

Every call's agent is `EchoAgent` (a fake, no model); timeouts are configured short so the tests take seconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import Counter

import pytest

from .test_sip_protocol import Client, call, hang_up, header, in_dialog, invite
from .test_sip_support import echo_calls, sip_service

#: real sockets and real timeouts (seconds each): the slow tier
pytestmark = pytest.mark.slow

SHORT = {"tcp_message_timeout_s": 0.5, "tcp_idle_timeout_s": 1.0}


def options(port: int, transport: str = "UDP", call_id: str = "opt") -> bytes:
    return (f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bK-{call_id}"
            f";rport\r\nFrom: <sip:t@x>;tag=1\r\nTo: <sip:agent@x>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` s (what it sent before is skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def tcp_exchange(address, data: bytes, timeout: float = 3.0) -> bytes:
    """Send ``data`` on a fresh TCP connection; everything the server sends until it closes or ``timeout`` s pass."""
    reader, writer = await asyncio.open_connection(*address)
    got = b""
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                got += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return got


async def test_idle_and_unfinished_tcp_connections_are_capped_and_closed(config):
    settings = {**SHORT, "tcp_max_connections": 50, "tcp_max_connections_per_source": 50}
    async with sip_service(config, call_factory=echo_calls, sip=settings) as (service, observer):
        transport = service.transport
        conns = []
        for i in range(200):   # half say nothing, half start a message they never finish
            reader, writer = await asyncio.open_connection(*service.address)
            if i % 2:
                writer.write(b"INVITE sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bK-x\r\n")
            conns.append((reader, writer))
        await asyncio.sleep(0.1)
        assert transport.open_connections == 50                              # the cap holds
        refused = await asyncio.gather(*[closed_by_peer(r, 0.3) for r, _ in conns[50:]])
        assert all(refused)                                                   # the rest closed at once
        assert sum(n for reason, n in transport.refused.items() if "tcp_max_connections" in reason) == 150

        client = await Client.open(service.address)                           # UDP still answers while TCP is full
        ok = await call(client)
        await hang_up(client, ok)

        closed = await asyncio.gather(*[closed_by_peer(r, 2.5) for r, _ in conns[:50]])
        assert all(closed) and transport.open_connections == 0                # silent or unfinished: closed (0.5 s)
        assert any("no message in time" in reason for reason in transport.refused)

        # a real INVITE over a fresh connection is answered, and its call's connection outlives the idle timeout
        reader, writer = await asyncio.open_connection(*service.address)
        port = writer.get_extra_info("sockname")[1]
        writer.write(invite(client, call_id="tcp-call", branch="z9hG4bK-tc").replace("SIP/2.0/UDP", "SIP/2.0/TCP")
                     .replace(f":{client.port}", f":{port}").encode())
        head = b""
        while b"SIP/2.0 200 OK" not in head:
            head += await asyncio.wait_for(reader.read(65536), 5)
        ok = head.decode()[head.decode().index("SIP/2.0 200 OK"):]
        writer.write(in_dialog(client, "ACK", ok, 1).replace("SIP/2.0/UDP", "SIP/2.0/TCP").encode())
        assert not await closed_by_peer(reader, 1.5)                          # > tcp_idle_timeout_s, but in a call
        assert service.active_calls == 2 - 1
        writer.write(in_dialog(client, "BYE", ok, 2).replace("SIP/2.0/UDP", "SIP/2.0/TCP").encode())
        assert b"SIP/2.0 200 OK" in await asyncio.wait_for(reader.read(65536), 5)
        assert await closed_by_peer(reader, 2.5)                              # no call any more: idle closes it
        assert any("idle" in reason for reason in transport.refused)
        client.close()
        for _, w in conns:
            w.close()


async def test_per_source_cap_slow_sender_keepalive_and_size_limit(config):
    settings = {**SHORT, "tcp_max_connections": 50, "tcp_max_connections_per_source": 5, "max_message_bytes": 4096}
    async with sip_service(config, call_factory=echo_calls, sip=settings) as (service, observer):
        conns = [await asyncio.open_connection(*service.address) for _ in range(8)]
        await asyncio.sleep(0.1)
        assert service.transport.open_connections == 5
        assert all(await asyncio.gather(*[closed_by_peer(r, 0.3) for r, _ in conns[5:]]))
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.1)

        # a slow sender: one byte every 0.1 s never finishes within tcp_message_timeout_s, though never idle
        reader, writer = await asyncio.open_connection(*service.address)
        message = options(1, "TCP", "slow")

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in message[:40]:   # 4 s of sending, if nobody stops it
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

        sender = asyncio.create_task(trickle())
        assert await closed_by_peer(reader, 2.0)                              # closed long before the 4 s are up
        assert not sender.done()
        sender.cancel()
        writer.close()

        # keep-alive ping (CRLFCRLF) gets a pong (CRLF), then a message on the same connection is answered
        reader, writer = await asyncio.open_connection(*service.address)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), 2) == b"\r\n"
        writer.write(options(1, "TCP", "after-ping"))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)).startswith(b"SIP/2.0 200 ")
        writer.close()

        # too large: 513 over TCP (then closed) and over UDP
        big = options(1, "TCP", "big").replace(b"Content-Length: 0", b"Content-Length: 100000")
        got = await tcp_exchange(service.address, big)
        assert got.startswith(b"SIP/2.0 513 ")
        client = await Client.open(service.address)
        client.send(options(client.port, "UDP", "big-udp").replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n"))
        assert (await client.expect(513)).startswith("SIP/2.0 513 ")
        client.send(options(client.port))
        await client.expect(200)
        client.close()


async def test_a_disallowed_source_is_closed_at_accept(config):
    async with sip_service(config, call_factory=echo_calls, sip={"allowed_sources": ["10.0.0.0/8"]}) as (service, _):
        reader, writer = await asyncio.open_connection(*service.address)
        assert await closed_by_peer(reader, 1.0)                              # before it sent a byte
        assert service.transport.open_connections == 0
        assert any("allowed_sources" in reason for reason in service.transport.refused)
        writer.close()


# ------------------------------------------------------------------ fuzz
def _sub(pattern: str, repl: str, count: int = 1):
    return lambda m: re.sub(pattern, repl, m, count=count, flags=re.MULTILINE)


def _duplicate(name: str, value: str):
    return lambda m: re.sub(rf"^({name}: [^\r]*\r\n)", rf"\1{name}: {value}\r\n", m, count=1, flags=re.MULTILINE)


def _content_length(fn):
    def mutate(m: str) -> str:
        body = m.partition("\r\n\r\n")[2]
        return re.sub(r"^Content-Length: \d+", f"Content-Length: {fn(len(body))}", m, flags=re.MULTILINE)
    return mutate


# each makes an INVITE malformed on its own; the fuzz applies one to three of them, chosen by a seeded Random
MUTATIONS = {
    "empty Via": _sub(r"^Via: [^\r]*", "Via:"),
    "missing Via": _sub(r"^Via: [^\r]*\r\n", "", 0),
    "garbage second Via": _duplicate("Via", "garbage"),
    "Via without host": _sub(r"^Via: SIP/2.0/(\w+) [^;\r]*", r"Via: SIP/2.0/\1 "),
    "Via port out of range": _sub(r"^(Via: SIP/2.0/\w+ [\d.]+):\d+", r"\1:99999"),   # asyncio's sendto would
    "Contact port out of range": _sub(r"^(Contact: <sip:[^:>]*@[\d.]+):\d+", r"\1:70000"),   # close the socket
    **{f"empty {h}": _sub(rf"^{h}: [^\r]*", f"{h}:") for h in ("From", "To", "Call-ID", "CSeq")},
    **{f"missing {h}": _sub(rf"^{h}: [^\r]*\r\n", "", 0) for h in ("From", "To", "Call-ID", "CSeq")},
    "duplicate From": _duplicate("From", "<sip:u@x>;tag=2"),
    "duplicate To": _duplicate("To", "<sip:v@x>"),
    "duplicate Call-ID": _duplicate("Call-ID", "other"),
    "duplicate CSeq": _duplicate("CSeq", "2 INVITE"),
    "CSeq not a number": _sub(r"^CSeq: \d+", "CSeq: x"),
    "CSeq too large": _sub(r"^CSeq: \d+", "CSeq: 99999999999"),
    "CSeq wrong method": _sub(r"^CSeq: (\d+) INVITE", r"CSeq: \1 BYE"),
    "From not an address": _sub(r"^From: [^\r]*", "From: <<<>>>"),
    "Contact garbage": _sub(r"^Contact: [^\r]*", "Contact: <sip:"),
    "Record-Route garbage": _sub(r"^(Max-Forwards)", r"Record-Route: <<;;>>\r\n\1"),
    "Max-Forwards not a number": _sub(r"^Max-Forwards: \d+", "Max-Forwards: many"),
    "Content-Length negative": _content_length(lambda n: -n),
    "Content-Length not a number": _content_length(lambda n: f"{n}abc"),
    "Content-Length huge": _content_length(lambda n: 10**15),
    "Content-Length longer than body": _content_length(lambda n: n + 17),
    "body longer than Content-Length": _content_length(lambda n: 5),   # the SDP cut after "v=0"
    "two Content-Lengths": _sub(r"^(Content-Length: \d+\r\n)", r"\1Content-Length: 3\r\n"),
    "bad start line": _sub(r"\A[^\r]*", "INVITE  sip:agent@127.0.0.1 SIP/2.0 extra"),
    "start line without version": _sub(r"\A(\w+ \S+) SIP/2.0", r"\1"),
    "garbage start line": _sub(r"\A[^\r]*", "HELLO WORLD"),
    "SIP version 3.0": _sub(r"\A(\w+ \S+) SIP/2.0", r"\1 SIP/3.0"),
    "SIP version 1.0": _sub(r"\A(\w+ \S+) SIP/2.0", r"\1 SIP/1.0"),
    "Request-URI garbage": _sub(r"\A(\w+) \S+", r"\1 <<>>"),
    "non-UTF-8 in From": _sub(r"^From: <", "From: \udcff\udcfe<"),
    "NUL in To": _sub(r"^To: <", "To: \x00<"),
    "folded line after the start line": _sub(r"\A([^\r]*\r\n)", r"\1  continued\r\n"),
    "header line without colon": _sub(r"^(Max-Forwards)", r"this is not a header\r\n\1"),
    "huge header": _sub(r"^(Max-Forwards)", "X-Pad: " + "a" * 20000 + r"\r\n\1"),
    "no empty line after the headers": lambda m: m.split("\r\n\r\n", 1)[0] + "\r\n",
    "cut in the middle of the headers": lambda m: m[: m.index("Call-ID")],
}


# no usable Via, From, To, Call-ID or CSeq: nowhere (or nothing valid) to answer, so dropped with a log line
UNROUTABLE = {f"{how} {h}" for how in ("empty", "missing") for h in ("Via", "From", "To", "Call-ID", "CSeq")} | {
    "Via without host", "cut in the middle of the headers"}
# over TCP these wait for bytes that never come: closed after sip.tcp_message_timeout_s
TCP_UNFINISHED = {"Content-Length longer than body", "no empty line after the headers"}


def mutants(rng: random.Random, n: int, base) -> list[tuple[str, bytes]]:
    names = sorted(MUTATIONS)
    out = []
    for i in range(n):
        chosen = [names[i]] if i < len(names) else rng.sample(names, rng.randrange(2, 4))   # each alone, then mixes
        text = base(i)
        for name in chosen:
            text = MUTATIONS[name](text)
        out.append((" + ".join(chosen), text.encode("utf-8", "surrogateescape")))
    return out


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_fuzzed_invites_get_an_error_or_nothing_over_udp_and_tcp(config):
    settings = {**SHORT, "tcp_max_connections": 1000, "tcp_max_connections_per_source": 1000,
                "max_message_bytes": 16384}
    loop = asyncio.get_running_loop()
    escaped: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    errors = _ErrorRecords()
    logging.getLogger("sub300").addHandler(errors)
    rng = random.Random(9)
    try:
        async with sip_service(config, call_factory=echo_calls, sip=settings) as (service, observer):
            # UDP: one socket per mutant, all at once
            clients = [await Client.open(service.address) for _ in range(120)]
            udp = mutants(rng, 120, lambda i: invite(clients[i], call_id=f"u{i}", branch=f"z9hG4bK-u{i}"))
            for client, (_, data) in zip(clients, udp, strict=True):
                client.send(data)
            # TCP: one connection per mutant (a broken frame ends its connection), all at once
            tcp = mutants(rng, 120, lambda i: invite(clients[0], call_id=f"t{i}", branch=f"z9hG4bK-t{i}")
                          .replace("SIP/2.0/UDP", "SIP/2.0/TCP"))
            answers = await asyncio.gather(*[tcp_exchange(service.address, data, timeout=2.0) for _, data in tcp])
            await asyncio.sleep(0.3)
            bad, statuses = [], []
            for (name, _), client in zip(udp, clients, strict=True):
                # only SIP responses count: other tests on this host may send stray datagrams (STUN) to our ports
                got = [m.split("\r\n", 1)[0] for m in await client.silent(0) if m.startswith("SIP/")]
                statuses.append(("UDP", got[0][8:11] if got else "-"))
                bad += [("UDP", name, line) for line in got if not re.match(r"SIP/2\.0 [45]\d\d ", line)]
            for (name, _), answer in zip(tcp, answers, strict=True):
                got = re.findall(rb"^SIP/2\.0 (\d{3}) ", answer, re.MULTILINE)
                statuses.append(("TCP", got[0].decode() if got else "-"))
                bad += [("TCP", name, status) for status in got if not status.startswith((b"4", b"5"))]
            assert bad == []                                                  # an error status, or nothing
            print(sorted(Counter(statuses).items()))
            silent = [(t, name) for (t, status), (name, _) in zip(statuses, udp + tcp, strict=True)
                      if status == "-" and " + " not in name and name not in UNROUTABLE
                      and not (t == "TCP" and name in TCP_UNFINISHED)]
            assert silent == []                                               # what can be answered, is
            assert service.active_calls == 0 and service.uas.dialogs == {}     # no call slot taken
            # and the service still answers, over both transports
            probe = clients[0]
            probe.send(options(probe.port, "UDP", "after-fuzz"))
            await probe.expect(200)
            assert (await tcp_exchange(service.address, options(1, "TCP", "after-fuzz-tcp"), 0.5)).startswith(
                b"SIP/2.0 200 ")
            ok = await call(probe, call_id="real", branch="z9hG4bK-real")
            await hang_up(probe, ok)
            for client in clients:
                client.close()
    finally:
        logging.getLogger("sub300").removeHandler(errors)
    assert escaped == []
    assert [r.getMessage() for r in errors.records] == []
    assert header(ok, "Content-Type") == "application/sdp"


async def test_folded_and_compact_headers_are_valid_and_answered(config):
    """RFC 3261 §7.3.1 folding and §7.3.3 compact forms are not malformed: the call is answered."""
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        client = await Client.open(service.address)
        text = invite(client, call_id="folded", branch="z9hG4bK-fold")
        text = (text.replace("Via: ", "v: ").replace("Call-ID: ", "i: ")
                .replace("Max-Forwards: 70\r\n", "Subject: a question\r\n  folded over\r\n\ttwo lines\r\nMax-Forwards: 70\r\n"))
        client.send(text)
        ok = await client.expect(200, timeout=10)
        assert header(ok, "Call-ID") == "folded"
        client.send(in_dialog(client, "ACK", ok, 1))
        await hang_up(client, ok)
        client.close()


async def test_a_handler_that_raises_is_answered_500_and_the_transport_goes_on(caplog):
    """The transport's handler boundary: an unexpected exception is logged once, the request answered 500."""
    from sub300.media.sip.transport import SipTransport

    calls = []

    def handler(data: bytes, flow) -> None:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        flow.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")

    transport = SipTransport(handler)
    await transport.start("127.0.0.1", 0)
    try:
        client = await Client.open(transport.address)
        client.send(options(client.port))
        assert (await client.expect(500)).startswith("SIP/2.0 500 Server Internal Error\r\n")
        client.send(options(client.port, call_id="again"))
        await client.expect(200)
        assert (await tcp_exchange(transport.address, options(1, "TCP"), 0.5)).startswith(b"SIP/2.0 200 ")
        client.close()
    finally:
        await transport.close()
    crashes = [r for r in caplog.records if "crashed its handler" in r.getMessage()]
    assert len(crashes) == 1 and crashes[0].exc_info is not None


async def test_closing_with_tcp_connections_open_raises_nothing_in_callbacks(config):
    """Closing the service cancels each connection's task; asyncio (3.11) must not log 'Exception in callback'."""
    escaped: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: escaped.append(context))
    async with sip_service(config, call_factory=echo_calls) as (service, _):
        conns = [await asyncio.open_connection(*service.address) for _ in range(3)]
        conns[0][1].write(b"OPTIONS sip:a@b SIP/2.0\r\n")                    # one in the middle of a message
        await asyncio.sleep(0.1)
        assert service.transport.open_connections == 3
    await asyncio.sleep(0.1)
    assert escaped == []
    assert all([await closed_by_peer(r, 1.0) for r, _ in conns])
    for _, w in conns:
        w.close()


async def test_a_peer_that_never_reads_is_dropped(config):
    """Pipelined requests whose responses are never read must not pile up in our memory."""
    import socket

    async with sip_service(config, call_factory=echo_calls, sip={"max_message_bytes": 16384}) as (service, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, service.address)
        reader, writer = await asyncio.open_connection(sock=sock)
        pad = "x" * 6000   # echoed in the Via and Call-ID of every response: 12 kB answers to fill the buffers quickly
        batch = b"".join(options(1, "TCP", f"p{i}{pad}") for i in range(50))
        with contextlib.suppress(ConnectionError):
            for _ in range(40):                                               # up to ~12 MB of answers
                writer.write(batch)
                await asyncio.wait_for(writer.drain(), 5)
                if any("does not read" in reason for reason in service.transport.refused):
                    break
        assert any("does not read" in reason for reason in service.transport.refused)
        await asyncio.sleep(0.1)
        assert service.transport.open_connections == 0
        writer.close()


async def test_an_invite_flood_from_a_refused_source_is_not_amplified(config, monkeypatch):
    """403s to a refused source are resent until their ACK (Timer G) only up to a bound; beyond, each goes once."""
    from sub300.media.sip import transactions

    monkeypatch.setattr(transactions, "MAX_RETRANSMITTING", 10)
    async with sip_service(config, call_factory=echo_calls, sip={"allowed_sources": ["10.0.0.0/8"]}) as (service, _):
        client = await Client.open(service.address)
        for i in range(40):
            client.send(invite(client, call_id=f"f{i}", branch=f"z9hG4bK-f{i}"))
        got = await client.silent(1.2)   # Timer G: resends at 0.5 s and 1.5 s
        refusals = [m for m in got if m.startswith("SIP/2.0 403 ")]
        assert 40 <= len(refusals) <= 40 + 10 * 2                             # each answered; only 10 resent
        assert len({header(m, "Call-ID") for m in refusals}) == 40
        client.close()


async def test_any_port_whose_tcp_twin_is_taken_is_given_back_and_another_tried(monkeypatch):
    """``port`` 0: UDP gets a free port, but its TCP twin may belong to another socket (a clean-clone CI run
    hit one): that UDP port goes back and another is tried, so the service has both on one number."""
    import socket

    from sub300.media.sip import transport as sip_transport

    start_server, tried = asyncio.start_server, []

    async def taken_once(*args, **kwargs):
        tried.append(args[2])
        if len(tried) == 1:
            raise OSError(98, "address already in use")
        return await start_server(*args, **kwargs)

    monkeypatch.setattr(sip_transport.asyncio, "start_server", taken_once)
    transport = sip_transport.SipTransport(lambda data, flow: None)
    await transport.start("127.0.0.1", 0)
    try:
        assert len(tried) == 2 and transport.address[1] == tried[1] and transport._tcp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # the first UDP port was given back
            s.bind(("127.0.0.1", tried[0]))
    finally:
        await transport.close()
