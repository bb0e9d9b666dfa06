"""RTP source validation and bounded buffers (`sub300.media.sip.rtp`, `sub300.media.sip.jitter`).

Real UDP sockets on 127.0.0.1: the endpoint under test and a caller socket
at the address the "SDP" signals; strangers are other sockets (other ports)
of the same host.  The endpoint's clock is a hand-moved fake, so the SSRC
quiet rule and the concealment budget do not depend on the machine's speed.
Floods are sent in paced batches (each waits until the endpoint has seen
it), so counts are exact, not at the mercy of the kernel's socket buffer.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct

import numpy as np
import pytest

from sub300.media.sip import g711
from sub300.media.sip.jitter import MAX_CONCEALED, ReorderBuffer
from sub300.media.sip.rtp import DTMF_BURST, MAX_LOGGED_STRANGERS, SSRC_SWITCH_S, RtpEndpoint, behind_nat
from sub300.media.sip.sdp import AudioParams

PAYLOAD = g711.encode("PCMU", np.full(160, 1000, np.int16))


class FakeClock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rtp(seq: int, ssrc: int, payload: bytes = PAYLOAD, pt: int = 0, ts: int | None = None) -> bytes:
    ts = seq * 160 if ts is None else ts
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


class Line:
    """An endpoint on a real socket, the frames it delivered, and a caller socket."""

    def __init__(self, signalled: tuple[str, int] | None = None, latching: str = "nat") -> None:
        self.clock = FakeClock()
        self.frames: list[np.ndarray | None] = []
        self.caller = udp()
        host, port = signalled or self.caller.getsockname()
        self.params = AudioParams(host, port, "PCMU", 0, 101, "sendrecv")
        self.endpoint = RtpEndpoint(self.params, lambda pcm, at: self.frames.append(pcm), lambda d: None,
                                    clock=self.clock, latching=latching)
        self.sock = udp()
        self.address = self.sock.getsockname()

    async def open(self) -> Line:
        await self.endpoint.open(self.sock)
        return self

    def seen(self) -> int:
        s = self.endpoint.stats
        return s.received + s.strangers + s.other_ssrc + s.malformed + s.dtmf + s.dtmf_dropped

    async def send(self, sock: socket.socket, packets: list[bytes]) -> None:
        """Send and wait until the endpoint has seen every packet (bounded in time)."""
        before = self.seen()
        for p in packets:
            sock.sendto(p, self.address)
        for _ in range(400):
            if self.seen() >= before + len(packets):
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {self.seen() - before} of {len(packets)} packets arrived")

    def close(self) -> None:
        self.endpoint.close()
        self.caller.close()


@contextlib.asynccontextmanager
async def opened(**kw):
    """A `Line`, open for the block and closed after it (on the test's own loop)."""
    call = await Line(**kw).open()
    try:
        yield call
    finally:
        call.close()


async def test_a_strangers_packets_are_dropped_counted_and_logged_once(caplog):
    caplog.set_level(logging.INFO, "sub300.media.sip.rtp")
    async with opened() as call:
        stranger = udp()
        await call.send(call.caller, [rtp(i, 0xCA11) for i in range(5)])
        assert call.endpoint.stats.latched == call.caller.getsockname()
        # a new SSRC from another port of the same host, in the middle of the call, long after the caller's last packet
        call.clock.now += 5.0
        await call.send(stranger, [rtp(9000 + i, 0xBAD) for i in range(50)])
        await call.send(call.caller, [rtp(i, 0xCA11) for i in range(5, 10)])
        stats = call.endpoint.stats
        assert stats.strangers == 50 and stats.received == 10
        assert stats.latched == call.caller.getsockname()
        assert len(call.frames) == 10 and all(f is not None and f.max() > 500 for f in call.frames)
        lines = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert len(lines) == 1 and str(stranger.getsockname()[1]) in lines[0].getMessage()
        stranger.close()


async def test_before_the_caller_a_stranger_cannot_latch_onto_a_signalled_public_or_loopback_address():
    async with opened() as call:
        stranger = udp()
        await call.send(stranger, [rtp(i, 0xBAD) for i in range(20)])     # the stranger is first
        assert call.endpoint.stats.latched is None and call.frames == []
        await call.send(call.caller, [rtp(i, 0xCA11) for i in range(3)])
        assert call.endpoint.stats.latched == call.caller.getsockname() and len(call.frames) == 3
        stranger.close()


@pytest.mark.parametrize("latching, signalled, latches", [
    ("nat", ("10.1.2.3", 4000), True),          # private: the caller is behind a NAT
    ("nat", ("100.64.0.9", 4000), True),        # CGNAT
    ("nat", ("0.0.0.0", 4000), True),           # address not known yet (RFC 2543 style)
    ("nat", ("93.184.216.34", 4000), False),    # a public address is taken as signalled
    ("off", ("10.1.2.3", 4000), False),
    ("always", ("93.184.216.34", 4000), True),
])
async def test_latching_once_onto_the_first_source(latching, signalled, latches):
    async with opened(signalled=signalled, latching=latching) as call:
        first, second = call.caller, udp()
        await call.send(first, [rtp(i, 0xCA11) for i in range(3)])
        if not latches:
            assert call.endpoint.stats.latched is None and call.endpoint.stats.strangers == 3
            second.close()
            return
        assert call.endpoint.stats.latched == first.getsockname()
        call.clock.now += 10.0                      # the first source quiet for long: still, never a second latch
        await call.send(second, [rtp(500 + i, 0xBAD) for i in range(3)])
        assert call.endpoint.stats.latched == first.getsockname() and call.endpoint.stats.strangers == 3
        assert len(call.frames) == 3
        second.close()


async def test_ssrc_switch_from_the_same_address_only_after_quiet():
    async with opened() as call:
        await call.send(call.caller, [rtp(i, 1) for i in range(5)])
        call.clock.now += SSRC_SWITCH_S / 2          # the current stream is not quiet yet: an interleaved SSRC is dropped
        await call.send(call.caller, [rtp(7000 + i, 2) for i in range(3)])
        assert call.endpoint.stats.other_ssrc == 3 and len(call.frames) == 5
        call.clock.now += SSRC_SWITCH_S * 2          # quiet: the new stream (a restart, a re-route) takes over
        await call.send(call.caller, [rtp(7003 + i, 2) for i in range(4)])
        assert call.endpoint.stats.other_ssrc == 3 and len(call.frames) == 9
        await call.send(call.caller, [rtp(5, 1)])    # the old stream again, now interleaved: dropped
        assert call.endpoint.stats.other_ssrc == 4


async def test_a_reinvite_to_a_new_address_moves_the_accepted_source_and_hold_does_not():
    async with opened() as call:
        await call.send(call.caller, [rtp(i, 1) for i in range(3)])
        moved = udp()
        host, port = moved.getsockname()
        # hold, RFC 2543 style: c=0.0.0.0 — the source stays
        call.endpoint.update(AudioParams("0.0.0.0", call.params.remote_port, "PCMU", 0, 101, "recvonly"))
        await call.send(call.caller, [rtp(3, 1)])
        assert call.endpoint.stats.latched == call.caller.getsockname() and len(call.frames) == 4
        # the caller moves its media (a re-INVITE with a new port)
        call.endpoint.update(AudioParams(host, port, "PCMU", 0, 101, "sendrecv"))
        await call.send(call.caller, [rtp(4, 1)])                      # the old address: a stranger now
        assert call.endpoint.stats.strangers == 1
        await call.send(moved, [rtp(100 + i, 7) for i in range(3)])    # the new one, with its own SSRC at once
        assert call.endpoint.stats.latched == (host, port) and len(call.frames) == 7
        # and we send to the new address
        call.endpoint.send(None)
        moved.settimeout(1.0)
        assert moved.recv(2048)[1] & 0x7F == 0
        moved.close()


@pytest.mark.slow   # 40,000 packets over loopback (1.4 s): the fast tier stays under 30 s
async def test_floods_leave_every_buffer_bounded(caplog):
    """20,000 packets from strangers (40 ports) and 20,000 out-of-order packets from the caller."""
    caplog.set_level(logging.INFO, "sub300.media.sip.rtp")
    async with opened() as call:
        endpoint = call.endpoint
        buffer: ReorderBuffer | None = None     # the caller's, made at its first packet
        strangers = [udp() for _ in range(40)]
        rng = random.Random(9)
        seqs = list(range(20_000))
        for start in range(0, len(seqs), 16):        # reordered within windows of 16, and a few from far away
            window = seqs[start:start + 16]
            rng.shuffle(window)
            seqs[start:start + 16] = window
        for k in rng.sample(range(20_000), 200):
            seqs[k] = rng.randrange(1 << 16)
        most_held = 0
        t0 = call.clock.now
        for batch in range(100):
            flood = [rtp(rng.randrange(1 << 16), rng.randrange(1 << 32)) for _ in range(200)]
            await call.send(strangers[batch % len(strangers)], flood)
            await call.send(call.caller, [rtp(s, 0xCA11) for s in seqs[batch * 200:(batch + 1) * 200]])
            buffer = endpoint._jitter if buffer is None else buffer
            assert endpoint._jitter is buffer, "the caller's buffer was never reset by a stranger"
            most_held = max(most_held, endpoint.held_packets)
            call.clock.now += 0.2                     # 100 batches in 20 s of call time
            endpoint.expire()
        stats = endpoint.stats
        assert stats.strangers == 20_000
        assert stats.latched == call.caller.getsockname()
        assert buffer is not None and most_held <= buffer.max_hold + 1 and endpoint.held_packets <= buffer.max_hold + 1
        assert len(endpoint._logged) == MAX_LOGGED_STRANGERS
        assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == MAX_LOGGED_STRANGERS
        # every delivered frame is one real packet or a concealed one, and the concealment is paced by the clock
        real = sum(f is not None for f in call.frames)
        concealed = len(call.frames) - real
        assert real <= stats.received
        assert concealed <= (call.clock.now - t0) / 0.020 + MAX_CONCEALED
        for s in strangers:
            s.close()


def test_reorder_buffer_conceals_a_real_loss_but_not_a_burst():
    buffer = ReorderBuffer()
    out = []
    t = 0.0
    for seq in [0, 1, 2, 3, 5, 6, 7, 8]:           # 4 is lost, packets 20 ms apart
        out += buffer.push(seq, b"x", t)
        t += 0.020
    assert [p for p, _ in out].count(None) == 1 and len(out) == 9
    burst = ReorderBuffer()
    out = []
    for seq in range(0, 4000, 2):                 # every other packet missing, all at one instant
        out += burst.push(seq, b"x", 1.0)
        assert len(burst) <= burst.max_hold + 1
    assert [p for p, _ in out].count(None) == 0, "a burst cannot make up silence it did not take to arrive"


def test_behind_nat():
    assert behind_nat("192.168.1.2") and behind_nat("10.0.0.1") and behind_nat("100.100.1.1")
    assert behind_nat("0.0.0.0") and behind_nat("fe80::1") and behind_nat("fd00::1")
    assert not behind_nat("127.0.0.1") and not behind_nat("8.8.8.8") and not behind_nat("2001:4860::8888")


def dtmf(seq: int, event: int, ts: int, ssrc: int) -> bytes:
    return rtp(seq, ssrc, struct.pack("!BBH", event, 0x80 | 10, 800), pt=101, ts=ts)


async def test_dtmf_from_a_stranger_is_ignored_and_a_flood_is_paced():
    digits: list[str] = []
    async with opened() as call:
        call.endpoint.on_dtmf = digits.append
        stranger = udp()
        await call.send(call.caller, [rtp(0, 5)])
        await call.send(stranger, [dtmf(1 + i, 1, 1000 * (i + 1), 5) for i in range(20)])   # spoofed SSRC, too
        assert digits == [] and call.endpoint.stats.strangers == 20
        # 2,000 distinct events in one instant: a burst passes, the rest is dropped and counted
        for start in range(0, 2000, 200):
            await call.send(call.caller, [dtmf(1 + i, i % 10, 1000 * (i + 1), 5) for i in range(start, start + 200)])
        assert len(digits) == DTMF_BURST and call.endpoint.stats.dtmf_dropped == 2000 - DTMF_BURST
        # a person's pace (one key every 200 ms) is never dropped
        for i in range(30):
            call.clock.now += 0.2
            await call.send(call.caller, [dtmf(3000 + i, 7, 10_000_000 + i * 1600, 5)])
        assert len(digits) == DTMF_BURST + 30
        stranger.close()
