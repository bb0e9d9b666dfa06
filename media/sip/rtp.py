"""One call's RTP socket: G.711 in and out, symmetric RTP with latching, DTMF events.

Symmetric RTP (RFC 4961) with latching: we send to the address the SDP
names until the caller's media arrives, then to wherever it actually comes
from — the one address a NAT will let back in.  A new source is latched
only when it also brings a new SSRC (a re-routed stream), so a stray packet
cannot steal the call's audio.
"""
from __future__ import annotations

import asyncio
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

@dataclass
class RtpStats:
    received: int = 0
    sent: int = 0
    dtmf: int = 0
    malformed: int = 0
    other_ssrc: int = 0      # packets of a second, interleaved stream, dropped
    latched: tuple[str, int] | None = None


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

    def __post_init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._jitter = ReorderBuffer()
        self._events = TelephoneEvents()
        self._remote_ssrc: int | None = None
        self._remote_last = float("-inf")
        self._seq = random.randrange(1 << 16)
        self._timestamp = random.randrange(1 << 32)
        self._ssrc = random.randrange(1, 1 << 32)
        self._talking = False

    async def open(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)

    @property
    def local_port(self) -> int:
        return self._transport.get_extra_info("sockname")[1] if self._transport else 0

    def update(self, params: AudioParams) -> None:
        """A re-INVITE changed the remote address, codec or direction."""
        if (params.remote_host, params.remote_port) != (self.params.remote_host, self.params.remote_port):
            self.stats.latched = None
        self.params = params

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
        if self.stats.latched != source:
            if self.stats.latched is not None and packet.ssrc == self._remote_ssrc:
                return   # same stream from elsewhere: not ours to follow
            log.debug("RTP latched to %s:%d (ssrc %08x)", *source, packet.ssrc)
            self.stats.latched = source
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
            if digit is not None:
                self.stats.dtmf += 1
                self.on_dtmf(digit)
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
        destination = self.stats.latched or (self.params.remote_host, self.params.remote_port)
        self._transport.sendto(packet.serialize(), destination)
        self.stats.sent += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
