"""Measure what an RTP flood does to one SIP call (issue 9, kind 7): memory, audio fed to the agent, who owns the call.

A SIP call on 127.0.0.1 (the agent: a `Conversation` on the named fakes, so no model is loaded and the
numbers are the media path's own); the caller streams 20 ms packets in real time; meanwhile a stranger
(another port) floods ``--stranger`` packets with random sequence numbers and SSRCs, and the caller's own
address sends ``--reordered`` packets out of order.  Prints one markdown table row.

    .venv/bin/python scripts/rtp_flood.py --stranger 20000 --reordered 20000
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import resource
import socket
import struct
import time

import numpy as np

from sub300.agent.config import load_config
from sub300.media.sip import g711
from sub300.media.sip.service import conversation_calls, start_sip_service
from sub300.testing.fakes import fake_engines


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")


def invite(sip_port: int, my_port: int, rtp_port: int) -> bytes:
    body = SDP.format(port=rtp_port)
    return (f"INVITE sip:agent@127.0.0.1:{sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{my_port};branch=z9hG4bK-f1;rport\r\n"
            "From: <sip:f@127.0.0.1>;tag=ff\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: flood\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:f@127.0.0.1:{my_port}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode()


def ack(ok: str, sip_port: int, my_port: int) -> bytes:
    to = re.search(r"^To:\s*(.*)$", ok, re.MULTILINE | re.IGNORECASE).group(1).strip()
    return (f"ACK sip:agent@127.0.0.1:{sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{my_port};branch=z9hG4bK-f2;rport\r\n"
            f"From: <sip:f@127.0.0.1>;tag=ff\r\nTo: {to}\r\nCall-ID: flood\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def rtp(seq: int, ssrc: int, payload: bytes) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + payload


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stranger", type=int, default=20000, help="packets from a second address")
    parser.add_argument("--reordered", type=int, default=20000, help="out-of-order packets from the caller")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the caller streams (s)")
    args = parser.parse_args()
    config = load_config(environ={})
    config.sip.port, config.sip.host = 0, "127.0.0.1"
    service = await start_sip_service(config, None, call_factory=conversation_calls(fake_engines(), config), tcp=False)
    sip_port = service.address[1]
    sig = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sig.bind(("127.0.0.1", 0))
    sig.setblocking(False)
    caller, stranger = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    caller.bind(("127.0.0.1", 0))
    stranger.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    sig.sendto(invite(sip_port, sig.getsockname()[1], caller.getsockname()[1]), ("127.0.0.1", sip_port))
    ok = ""
    while " 200 " not in ok.split("\r\n", 1)[0]:
        ok = (await loop.sock_recv(sig, 65536)).decode()
    sig.sendto(ack(ok, sip_port, sig.getsockname()[1]), ("127.0.0.1", sip_port))
    agent_port = int(re.search(r"m=audio (\d+)", ok).group(1))
    (dialog,) = service.uas.dialogs.values()
    sip_call = dialog.call
    fed = [0]
    push = sip_call.agent.push_frame

    def counting(frame):
        fed[0] += 1
        push(frame)

    sip_call.agent.push_frame = counting
    rng = random.Random(1)
    voice = g711.encode("PCMU", (np.sin(np.arange(160) / 3) * 8000).astype(np.int16))
    dest = ("127.0.0.1", agent_port)
    before = rss_mb()
    t0 = time.monotonic()
    most_held = 0

    async def stream() -> None:   # the caller, in real time
        for seq in range(int(args.seconds / 0.02)):
            caller.sendto(rtp(seq, 0xCA11, voice), dest)
            await asyncio.sleep(0.02)

    async def flood() -> None:
        nonlocal most_held
        sent_s = sent_r = 0
        base = 50_000
        while sent_s < args.stranger or sent_r < args.reordered:
            for _ in range(min(100, args.stranger - sent_s)):
                stranger.sendto(rtp(rng.randrange(1 << 16), rng.randrange(1 << 32), voice), dest)
                sent_s += 1
            for _ in range(min(100, args.reordered - sent_r)):
                caller.sendto(rtp(base + rng.randrange(3000), 0xCA11, voice), dest)
                sent_r += 1
            endpoint = sip_call.endpoint
            most_held = max(most_held, len(endpoint._jitter._held))
            await asyncio.sleep(0.005)

    await asyncio.gather(stream(), flood())
    await asyncio.sleep(0.5)
    stats = sip_call.endpoint.stats
    wall = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    owner = "caller" if stats.latched == caller.getsockname() else f"{stats.latched}"
    print("| stranger pkts | reordered pkts | call s | RSS before MB | RSS after MB | peak RSS MB | frames fed | "
          "caller pkts accepted | strangers dropped | max held in reorder buffer | media source at end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.stranger} | {args.reordered} | {wall:.1f} | {before:.0f} | {rss_mb():.0f} | {peak:.0f} | {fed[0]} | "
          f"{stats.received} | {getattr(stats, 'strangers', 'n/a')} | {most_held} | {owner} |")
    await service.close()


if __name__ == "__main__":
    asyncio.run(main())
