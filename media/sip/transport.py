"""SIP over UDP and TCP on one address.

Both hand every message to one callback with the flow it came on; a
response or in-dialog request goes back on the flow (the same TCP
connection, or UDP to an address).  TCP framing follows RFC 3261 §18.3:
headers up to the empty line, then exactly Content-Length bytes.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from sub300.agent.tasks import TaskOwner

log = logging.getLogger(__name__)
MAX_MESSAGE = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


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
    def __init__(self, handler: Handler):
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send_to(self, data: bytes, destination: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, destination)

    def datagram_received(self, data: bytes, addr) -> None:
        if data.strip(b"\r\n\x00 ") == b"":
            return   # CRLF keep-alive (RFC 5626)
        self.handler(data, Flow("UDP", (addr[0], addr[1]), self.send_to))

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP error: %s", exc)


class SipTransport:
    """SIP sockets on one address: UDP, and TCP on the same port; every message goes to ``handler(data, flow)``.

    Each TCP connection's reader is a task owned by ``connections`` (a
    `TaskOwner`); `close()` stops listening and ends them all.
    """

    def __init__(self, handler: Handler):
        self.handler = handler
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self.connections = TaskOwner("sip-tcp")
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int, tcp: bool = True) -> None:
        """Bind UDP (OSError when it cannot) and, when asked, TCP on the port UDP got (a warning when it cannot)."""
        loop = asyncio.get_running_loop()
        transport, self._udp = await loop.create_datagram_endpoint(lambda: _Udp(self.handler), local_addr=(host, port))
        self.address = transport.get_extra_info("sockname")[:2]
        if tcp:
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, self.address[1])
            except OSError as error:   # UDP is what gateways use; TCP is a bonus
                log.warning("SIP over TCP not available on %s:%d: %s", host, self.address[1], error)

    def send_udp(self, data: bytes, destination: tuple[str, int]) -> None:
        if self._udp is not None:
            self._udp.send_to(data, destination)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None   # asyncio runs each connection's handler as a task
        self.connections.adopt(task)
        peer = writer.get_extra_info("peername")[:2]

        def send_to(data: bytes, _destination) -> None:
            if not writer.is_closing():
                writer.write(data)

        flow = Flow("TCP", (peer[0], peer[1]), send_to)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.strip(b"\r\n") == b"":
                    continue   # keep-alive
                match = _CONTENT_LENGTH.search(head)
                length = int(match.group(1)) if match else 0
                if length > MAX_MESSAGE:
                    break
                body = await reader.readexactly(length)
                self.handler(head + body, flow)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """Close the sockets and wait for every connection's task."""
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
        await self.connections.aclose()
        if self._tcp is not None:
            await self._tcp.wait_closed()
