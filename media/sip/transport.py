"""SIP over UDP and TCP on one address, bounded against abuse.

Both hand every message to one callback with the flow it came on; a
response or in-dialog request goes back on the flow (the same TCP
connection, or UDP to an address).  TCP framing follows RFC 3261 §18.3:
headers up to the empty line, then exactly Content-Length bytes (a missing,
negative, non-numeric or conflicting Content-Length breaks the framing:
400 where it can be addressed, and the connection is closed).

What a peer may hold (`TcpLimits`, from the ``[sip]`` section):

* a connection that starts a message must finish it within
  ``message_timeout_s``, and a new connection must deliver its first whole
  message within ``message_timeout_s`` of being accepted; after that, one
  that sends nothing for ``idle_timeout_s`` between messages is closed,
  unless it carries a call (``in_use``), since our BYE would go on it.  CRLF
  keep-alives (RFC 5626 §4.4.1: a double CRLF "ping" is answered by a single
  CRLF "pong") count as traffic between messages;
* at most ``max_connections`` open connections, ``max_per_source`` from one
  IP address; one more is closed at once, at accept;
* a message (UDP datagram or TCP message) larger than ``max_message_bytes``
  is refused: 513 Message Too Large (RFC 3261 §21.5.13) where it can be
  addressed, then (TCP) the connection is closed;
* a peer that does not read: once more than ``WRITE_BUFFER_MESSAGES``
  times ``max_message_bytes`` of our output waits in its connection's
  buffer (beyond the kernel's), the connection is aborted;
* ``accept(host)`` (the `SourceFilter` of ``sip.allowed_sources``) is asked
  when a TCP connection is accepted: a source it refuses is closed before a
  byte is read.

Each refusal is counted in ``refused`` (by reason) and logged once per
reason and source address.  No exception from the handler escapes: the
transport logs it (with its traceback, once) and answers 500 where the
message can be addressed; the socket stays up.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sub300.agent.tasks import TaskOwner

from . import message as sip

log = logging.getLogger(__name__)
MAX_MESSAGE = 64 * 1024
_LOGGED_MAX = 1024   # (reason, host) pairs remembered for "log once"
#: ``port`` 0: UDP ports tried until TCP can bind the same number too
_ANY_PORT_TRIES = 8
WRITE_BUFFER_MESSAGES = 4   # a peer that leaves this many max-size messages of ours unread is dropped


@dataclass(frozen=True)
class TcpLimits:
    """Bounds on what a SIP peer may hold open (seconds, counts, bytes); see the module docstring."""

    message_timeout_s: float = 10.0
    idle_timeout_s: float = 180.0
    max_connections: int = 256
    max_per_source: int = 32
    max_message_bytes: int = MAX_MESSAGE


@dataclass(frozen=True)
class Flow:
    """Where a message came from and how to answer on the same path."""

    transport: str                    # UDP | TCP
    source: tuple[str, int]
    send_to: Callable[[bytes, tuple[str, int]], None]

    def send(self, data: bytes, destination: tuple[str, int] | None = None) -> None:
        self.send_to(data, destination or self.source)


Handler = Callable[[bytes, Flow], None]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport):
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send_to(self, data: bytes, destination: tuple[str, int]) -> None:
        """Send a datagram; never raises, and never lets a bad address close the socket.

        asyncio closes a datagram transport on any non-OSError from sendto
        (a port above 65535 from a Via or Contact is an OverflowError), and
        a host name there would be resolved by a blocking call: so the port
        is checked first, and a name is resolved off the loop.
        """
        if self.transport is None or self.transport.is_closing():
            return
        host, port = str(destination[0]), destination[1]
        if not isinstance(port, int) or not 0 < port < 65536:
            self.owner.refuse("datagram not sent: port out of range", host)
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self.owner.resolver.spawn(self._resolve_and_send(data, host, port), "sip-resolve")
            return
        self.transport.sendto(data, (host, port))

    async def _resolve_and_send(self, data: bytes, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as error:
            self.owner.refuse(f"datagram not sent: cannot resolve ({error})", host)
            return
        if infos and self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(OSError):
                self.transport.sendto(data, infos[0][4][:2])

    def datagram_received(self, data: bytes, addr) -> None:
        if data.strip(b"\r\n\x00 ") == b"":
            return   # CRLF keep-alive (RFC 5626 §4.4.2 uses STUN over UDP; bare CRLFs are ignored)
        flow = Flow("UDP", (addr[0], addr[1]), self.send_to)
        if len(data) > self.owner.limits.max_message_bytes:
            self.owner.refuse("message too large", addr[0])
            self.owner.answer_error(data, flow, 513, "Message Too Large")
            return
        self.owner.deliver(data, flow)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP error: %s", exc)


class SipTransport:
    """SIP sockets on one address: UDP, and TCP on the same port; every message goes to ``handler(data, flow)``.

    ``limits`` bounds TCP connections and message sizes; ``accept(host)``
    decides at accept whether a TCP peer may connect at all (default:
    everyone); ``in_use(flow)`` says whether a TCP flow carries a call (then
    it is not closed for being idle).  Each TCP connection's reader is a task
    owned by ``connections`` (a `TaskOwner`); `close()` stops listening and
    ends them all.  ``open_connections`` is the number of TCP connections
    open now; ``refused`` counts refusals by reason.
    """

    def __init__(self, handler: Handler, *, limits: TcpLimits | None = None,
                 accept: Callable[[str], bool] | None = None, in_use: Callable[[Flow], bool] | None = None):
        self.handler = handler
        self.limits = limits or TcpLimits()
        self.accept = accept or (lambda host: True)
        self.in_use = in_use or (lambda flow: False)
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self.connections = TaskOwner("sip-tcp")
        self.resolver = TaskOwner("sip-resolve")   # datagrams to a host name wait for its address here
        self.address: tuple[str, int] = ("", 0)
        self.open_connections = 0
        self._per_source: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    async def start(self, host: str, port: int, tcp: bool = True) -> None:
        """Bind UDP (OSError when it cannot) and, when asked, TCP on the port UDP got (a warning when it cannot).

        With ``port`` 0 (any free port) a UDP port whose TCP twin is taken (another socket's port, e.g. a
        client connection's) is given back and another one tried, up to `_ANY_PORT_TRIES` times."""
        loop = asyncio.get_running_loop()
        tries = _ANY_PORT_TRIES if port == 0 and tcp else 1
        for attempt in range(1, tries + 1):
            transport, self._udp = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
            self.address = transport.get_extra_info("sockname")[:2]
            if not tcp:
                return
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, self.address[1],
                                                       limit=self.limits.max_message_bytes)
                return
            except OSError as error:
                if attempt < tries:
                    transport.close()
                    continue
                # UDP is what gateways use; TCP is a bonus
                log.warning("SIP over TCP not available on %s:%d: %s", host, self.address[1], error)

    def send_udp(self, data: bytes, destination: tuple[str, int]) -> None:
        if self._udp is not None:
            self._udp.send_to(data, destination)

    # ------------------------------------------------------------ the handler boundary
    def deliver(self, data: bytes, flow: Flow) -> None:
        """Hand one message to the handler; an exception is logged once and answered 500 where possible."""
        try:
            self.handler(data, flow)
        except Exception:
            log.exception("SIP message from %s:%d (%s) crashed its handler", *flow.source, flow.transport)
            self.answer_error(data, flow, 500, "Server Internal Error")

    def answer_error(self, data: bytes, flow: Flow, status: int, reason: str) -> None:
        """Send ``status`` for a message we will not process, when its headers say where; never raises."""
        try:
            salvaged = sip.salvage(data, flow.source, status, reason)
            if salvaged is not None:
                flow.send(*salvaged)
        except Exception:
            log.exception("SIP: answering %d to %s:%d failed", status, *flow.source)

    def refuse(self, reason: str, host: str) -> None:
        """Count a refusal; log it the first time for this reason and address."""
        self.refused[reason] += 1
        if (reason, host) in self._logged:
            return
        if len(self._logged) >= _LOGGED_MAX:
            self._logged.clear()
        self._logged.add((reason, host))
        log.warning("SIP %s from %s (logged once per address; %d so far)", reason, host, self.refused[reason])

    # ------------------------------------------------------------ TCP
    def _admit(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None to take it."""
        if not self.accept(host):
            return "TCP connection refused: not in sip.allowed_sources"
        if self.open_connections >= self.limits.max_connections:
            return f"TCP connection refused: {self.limits.max_connections} open (sip.tcp_max_connections)"
        if self._per_source[host] >= self.limits.max_per_source:
            return (f"TCP connection refused: {self.limits.max_per_source} open from this address "
                    "(sip.tcp_max_connections_per_source)")
        return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        refusal = self._admit(host)
        if refusal is not None:
            self.refuse(refusal, host)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None   # asyncio runs each connection's handler as a task
        self.connections.adopt(task)
        self.open_connections += 1
        self._per_source[host] += 1

        def send_to(data: bytes, _destination) -> None:
            if writer.is_closing():
                return
            writer.write(data)
            if writer.transport.get_write_buffer_size() > WRITE_BUFFER_MESSAGES * self.limits.max_message_bytes:
                self.refuse("TCP connection closed: it does not read what we send", host)
                writer.transport.abort()   # ends the reader too (connection_lost)

        flow = Flow("TCP", (host, int(peer[1])), send_to)
        try:
            await self._read_messages(reader, flow)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # close(): end quietly.  Python 3.11's start_server callback calls task.exception() on this task,
            # which raises (and logs "Exception in callback") when the task ends cancelled (fixed in 3.12).
            pass
        finally:
            self.open_connections -= 1
            self._per_source[host] -= 1
            if self._per_source[host] <= 0:
                del self._per_source[host]
            writer.close()

    async def _read_messages(self, reader: asyncio.StreamReader, flow: Flow) -> None:
        """Read framed messages until the peer closes, stalls, or breaks the framing (then return)."""
        limits, host = self.limits, flow.source[0]
        loop = asyncio.get_running_loop()
        crlf, first_deadline = b"", loop.time() + limits.message_timeout_s
        while True:
            # between messages: wait for the first byte of the next one; until a first message is complete the
            # connection has tcp_message_timeout_s from accept, keep-alives or not (so silent sockets go fast)
            try:
                if first_deadline:
                    async with asyncio.timeout_at(first_deadline):
                        first = await reader.readexactly(1)
                else:
                    async with asyncio.timeout(limits.idle_timeout_s):
                        first = await reader.readexactly(1)
            except TimeoutError:
                if first_deadline:
                    self.refuse("TCP connection closed: no message in time (sip.tcp_message_timeout_s)", host)
                    return
                if self.in_use(flow):
                    continue
                self.refuse("TCP connection closed: idle (sip.tcp_idle_timeout_s)", host)
                return
            if first in b"\r\n":   # CRLFs before a start line are ignored (§7.5); CRLFCRLF is a ping
                crlf = (crlf + first)[-4:]
                if crlf == b"\r\n\r\n":
                    flow.send(b"\r\n")
                    crlf = b""
                continue
            crlf = b""
            try:
                async with asyncio.timeout_at(first_deadline or loop.time() + limits.message_timeout_s):
                    try:
                        head = first + await reader.readuntil(b"\r\n\r\n")
                    except asyncio.LimitOverrunError:   # no end of headers within the limit: 513 from what came
                        self.refuse("message too large", host)
                        partial = first + await reader.read(limits.max_message_bytes)
                        self.answer_error(partial, flow, 513, "Message Too Large")
                        return
                    length = sip.content_length(head)
                    if isinstance(length, str):
                        self.refuse(length, host)
                        self.answer_error(head, flow, 400, length)
                        return   # the framing is lost: nothing after this can be trusted
                    if len(head) + length > limits.max_message_bytes:
                        self.refuse("message too large", host)
                        self.answer_error(head, flow, 513, "Message Too Large")
                        return
                    body = await reader.readexactly(length)
            except TimeoutError:
                self.refuse("TCP connection closed: message not finished in time (sip.tcp_message_timeout_s)", host)
                return
            first_deadline = 0.0
            self.deliver(head + body, flow)

    async def close(self) -> None:
        """Close the sockets and wait for every connection's task."""
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
        await self.connections.aclose()
        await self.resolver.aclose()
        if self._tcp is not None:
            await self._tcp.wait_closed()
