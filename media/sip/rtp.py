"""One call's RTP socket: G.711 in and out, source validation and latching, DTMF events.

Whose packets are the caller's (RFC 3550 §8.2 and §6.2.1 source validation,
RFC 4961 symmetric RTP): the call *locks* onto one transport address — the
one the SDP signalled, as soon as a packet comes from it.  Where the
signalled address cannot be the real source (behind a NAT: a private,
CGNAT, link-local or ``0.0.0.0`` address), the endpoint *latches* once, at
the start of the call, onto the first source that sends, and keeps it (as
rtpengine and Asterisk's ``nat=yes`` do); `LATCHING` lists the policies
(config ``sip.rtp_latching``).  Every packet from any other address is
dropped and counted (`RtpStats.strangers`), and logged once per source.  A
re-INVITE that signals a new address unlocks the call (`RtpEndpoint.update`);
a hold to ``0.0.0.0`` does not.

Within the locked source, one stream at a time: a packet with a new SSRC is
taken only once the current stream has been quiet `SSRC_SWITCH_S` (a
re-routed or restarted stream), so interleaved streams are not mixed.

We send to the locked source (the one address a NAT lets back in), or to
the signalled address until one is locked.  Nothing here grows with the
number of packets: the reorder buffer holds a few packets, the set of
logged strangers is capped, and telephone-events become digits no faster
than a keypad can send them (`DTMF_PER_S`), so a flood of events cannot
queue keypad turns faster than a person could.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from aiortc.rtp import RtpPacket

from . import g711
from .dtmf import TelephoneEvents
from .jitter import ReorderBuffer
from .sdp import AudioParams

log = logging.getLogger(__name__)
SAMPLES_PER_PACKET = 160   # 20 ms at 8 kHz

#: a new SSRC replaces the current one only after the current one is quiet this long
SSRC_SWITCH_S = 0.2
#: ``sip.rtp_latching``: "off" — only the signalled address; "nat" — latch onto the first source when the
#: signalled address is behind a NAT (private, CGNAT, link-local, unspecified); "always" — latch onto the
#: first source whatever was signalled (peers that signal a wrong public address)
LATCHING = ("off", "nat", "always")
#: keys a keypad can send: ITU-T Q.24 allows 40 ms of tone and 40 ms of pause per digit (12.5 digits/s);
#: a burst of `DTMF_BURST` is let through (events bunched by the network), beyond that a flood is dropped
DTMF_PER_S = 12.5
DTMF_BURST = 16
#: strangers logged per call (one line each); further ones are only counted
MAX_LOGGED_STRANGERS = 16


@dataclass
class RtpStats:
    received: int = 0
    sent: int = 0
    dtmf: int = 0
    malformed: int = 0
    dtmf_dropped: int = 0    # digits beyond the keypad's possible rate (`DTMF_PER_S`), dropped
    other_ssrc: int = 0      # packets of a second, interleaved stream from the locked source, dropped
    strangers: int = 0       # packets from an address that is not the call's source, dropped
    latched: tuple[str, int] | None = None   # the source the call is locked onto (signalled or latched)


def behind_nat(host: str) -> bool:
    """A signalled address that cannot be where the packets come from: private (RFC 1918, RFC 4193),
    shared (RFC 6598 CGNAT), link-local, or unspecified (RFC 2543 hold).  Loopback is exact, not NAT."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False   # a host name: trust it as signalled
    if ip.is_loopback:
        return False
    cgnat = ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10")
    return ip.is_private or ip.is_link_local or ip.is_unspecified or cgnat


class PortAllocator:
    """Even ports from [low, high], tried from a random start so restarts do not collide with old calls."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low + (low & 1), high

    def bind(self, host: str) -> socket.socket:
        ports = list(range(self.low, self.high + 1, 2))
        start = random.randrange(len(ports))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for port in ports[start:] + ports[:start]:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            return sock
        raise OSError(f"no free RTP port in {self.low}-{self.high}")


@dataclass
class RtpEndpoint(asyncio.DatagramProtocol):
    params: AudioParams
    on_audio: Callable[[np.ndarray | None, float], None]     # 8 kHz int16 (None: a lost packet), arrival time
    on_dtmf: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    stats: RtpStats = field(default_factory=RtpStats)
    latching: str = "nat"     #: one of `LATCHING`

    def __post_init__(self) -> None:
        if self.latching not in LATCHING:
            raise ValueError(f"latching {self.latching!r}: one of {', '.join(LATCHING)}")
        self._transport: asyncio.DatagramTransport | None = None
        self._signalled = (self.params.remote_host, self.params.remote_port)
        self._logged: set[tuple[str, int]] = set()
        self._dtmf_tokens, self._dtmf_at = float(DTMF_BURST), float("-inf")
        self._jitter = ReorderBuffer()
        self._events = TelephoneEvents()
        self._remote_ssrc: int | None = None
        self._remote_last = float("-inf")
        self._seq = random.randrange(1 << 16)
        self._timestamp = random.randrange(1 << 32)
        self._ssrc = random.randrange(1, 1 << 32)
        self._talking = False

    @property
    def packets_lost(self) -> int:
        """The caller's packets the reorder buffer gave up waiting for (media/sip/jitter.py), so far."""
        return self._jitter.lost

    async def open(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)

    @property
    def local_port(self) -> int:
        return self._transport.get_extra_info("sockname")[1] if self._transport else 0

    def update(self, params: AudioParams) -> None:
        """A re-INVITE changed the remote address, codec or direction.

        A new signalled address unlocks the source (the next packet from it
        locks again; latching as at the start of a call).  A hold to
        ``0.0.0.0`` moves nothing: the locked source stays.
        """
        address = (params.remote_host, params.remote_port)
        if not params.on_hold and address != self._signalled:
            self._signalled = address
            self.stats.latched = None
            self._remote_ssrc = None
            self._jitter = ReorderBuffer()
        self.params = params

    def _accepts(self, source: tuple[str, int]) -> bool:
        """Is ``source`` the call's media source?  Locks onto it when the call has none yet."""
        if self.stats.latched is not None:
            return source == self.stats.latched
        host, port = self._signalled
        if not (_same_host(source[0], host) and source[1] == port):
            if not self._may_latch(host):
                return False
            log.info("RTP latched to %s:%d (the SDP said %s:%d)", *source, host, port)
        self.stats.latched = source
        return True

    def _may_latch(self, host: str) -> bool:
        if self.latching == "always":
            return True
        if self.latching == "off":
            return False
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True   # a host name: where its packets come from cannot be checked without DNS
        return behind_nat(host)

    def _dtmf_allowed(self, now: float) -> bool:
        """A token bucket (`DTMF_BURST` deep, `DTMF_PER_S` refill): no more digits than a keypad can send."""
        if self._dtmf_at > float("-inf"):
            self._dtmf_tokens = min(float(DTMF_BURST), self._dtmf_tokens + (now - self._dtmf_at) * DTMF_PER_S)
        self._dtmf_at = now
        if self._dtmf_tokens < 1.0:
            return False
        self._dtmf_tokens -= 1.0
        return True

    def _stranger(self, source: tuple[str, int]) -> None:
        self.stats.strangers += 1
        if source not in self._logged and len(self._logged) < MAX_LOGGED_STRANGERS:
            self._logged.add(source)
            host, port = self.stats.latched or self._signalled
            log.warning("RTP from %s:%d dropped: the call's media comes from %s:%d (further packets only counted)",
                        *source, host, port)

    # ------------------------------------------------------------ receive
    def datagram_received(self, data: bytes, addr) -> None:
        now = self.clock()
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self.stats.malformed += 1
            return
        if 72 <= packet.payload_type <= 76:
            return   # RTCP on the RTP port (rtcp-mux): not used
        source = (addr[0], addr[1])
        if not self._accepts(source):
            self._stranger(source)
            return
        if packet.ssrc != self._remote_ssrc:
            # One caller, one stream (RFC 3550 source validation): a second SSRC is
            # taken only once the current one has gone quiet, so two interleaved
            # streams (a bridge, a peer reflecting our own packets) are not mixed.
            if self._remote_ssrc is not None and now - self._remote_last < SSRC_SWITCH_S:
                self.stats.other_ssrc += 1
                return
            self._remote_ssrc = packet.ssrc
            self._jitter = ReorderBuffer()
        self._remote_last = now
        if packet.payload_type == self.params.dtmf_payload_type:
            digit = self._events.feed(packet.payload, packet.timestamp)
            # the event's sequence numbers still count: let the buffer see a silent frame
            for payload, at in self._jitter.push(packet.sequence_number, b"", now):
                self._deliver(payload, at)
            if digit is not None and self._dtmf_allowed(now):
                self.stats.dtmf += 1
                self.on_dtmf(digit)
            elif digit is not None:
                self.stats.dtmf_dropped += 1
            return
        if packet.payload_type != self.params.payload_type:
            return   # comfort noise or a codec we did not agree on
        self.stats.received += 1
        for payload, at in self._jitter.push(packet.sequence_number, packet.payload, now):
            self._deliver(payload, at)

    def expire(self) -> None:
        for payload, at in self._jitter.expire(self.clock()):
            self._deliver(payload, at)

    def _deliver(self, payload: bytes | None, at: float) -> None:
        if payload == b"":
            return
        pcm = None if payload is None else g711.decode(self.params.codec, payload)
        self.on_audio(pcm, at)

    @property
    def held_packets(self) -> int:
        """Packets waiting in the reorder buffer (bounded by its ``max_hold``)."""
        return len(self._jitter)

    def error_received(self, exc: Exception) -> None:
        log.debug("RTP socket error: %s", exc)   # ICMP port unreachable while the far end is not up yet

    # ------------------------------------------------------------ send
    def send(self, pcm: np.ndarray | None) -> None:
        """One 20 ms packet: agent audio, or silence (None) so NATs and latching peers keep the path."""
        self._timestamp = (self._timestamp + SAMPLES_PER_PACKET) & 0xFFFFFFFF
        if self._transport is None or self.params.direction in ("recvonly", "inactive") or self.params.on_hold:
            return
        codec = self.params.codec
        payload = g711.silence(codec, SAMPLES_PER_PACKET) if pcm is None else g711.encode(codec, pcm)
        marker = int(pcm is not None and not self._talking)   # first packet of a talkspurt
        self._talking = pcm is not None
        packet = RtpPacket(payload_type=self.params.payload_type, marker=marker, sequence_number=self._seq,
                           timestamp=self._timestamp, ssrc=self._ssrc, payload=payload)
        self._seq = (self._seq + 1) & 0xFFFF
        destination = self.stats.latched or self._signalled
        self._transport.sendto(packet.serialize(), destination)
        self.stats.sent += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _same_host(a: str, b: str) -> bool:
    """The same IP address, however spelt (``::ffff:127.0.0.1`` is ``127.0.0.1``)."""
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    ia = getattr(ia, "ipv4_mapped", None) or ia
    ib = getattr(ib, "ipv4_mapped", None) or ib
    return ia == ib
