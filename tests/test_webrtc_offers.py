"""`POST /offer` against bad and mutated offers: 4xx that name the problem, never 5xx, no slot taken, nothing left.

The app is `build_app` on named fake engines (no model is loaded: an offer
never reaches the pipeline unless it is accepted, and then only its set-up
runs), served by aiohttp's TestServer on 127.0.0.1.  The seed offer is the
one aiortc's own RTCPeerConnection writes for an audio transceiver plus a
data channel, its candidates moved to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import re

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection

from sub300.testing.fakes import fake_engines
from sub300.web.server import METRICS_KEY, SIGNALLING_KEY, build_app
from sub300.web.signalling import BadOffer, parse_offer

FUZZ_SEED = 9
FUZZ_OFFERS = 400
INTERNALS = re.compile(r"Traceback|Error\(|Exception\(|File \"|line \d+, in|<[a-zA-Z_.]+ object at 0x")


async def seed_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    lines = []
    for line in pc.localDescription.sdp.splitlines():
        if line.startswith("a=candidate:"):
            if " typ host" not in line or ":" in line.split()[4]:
                continue   # keep IPv4 host candidates only, moved to loopback
            parts = line.split()
            parts[4] = "127.0.0.1"
            line = " ".join(parts)
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def body(sdp: str) -> bytes:
    return json.dumps({"sdp": sdp, "type": "offer"}).encode()


def edit(sdp: str, pattern: str, replacement: str, count: int = 0) -> str:
    """re.sub by lines of a CRLF text: ``.`` and ``$`` stop before the CR."""
    pattern = pattern.replace(".*", r"[^\r\n]*").replace("$", r"(?=\r?$)")
    out = re.sub(pattern, replacement, sdp, count=count, flags=re.MULTILINE)
    assert out != sdp, pattern
    return out


def audio_section(sdp: str) -> tuple[int, int]:
    lines = sdp.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    return start, end


def in_audio(sdp: str, transform) -> str:
    lines = sdp.split("\r\n")
    start, end = audio_section(sdp)
    lines[start:end] = transform(lines[start:end])
    return "\r\n".join(lines)


class App:
    def __init__(self, config) -> None:
        self.app = build_app(config, fake_engines())
        self.server = TestServer(self.app, host="127.0.0.1")

    async def __aenter__(self) -> App:
        await self.server.start_server()
        self.url = str(self.server.make_url("/offer"))
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.server.close()

    async def post(self, data: bytes) -> tuple[int, dict]:
        async with self.session.post(self.url, data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            assert not INTERNALS.search(text), text
            return r.status, json.loads(text)

    @property
    def signalling(self):
        return self.app[SIGNALLING_KEY]

    @property
    def metrics(self):
        return self.app[METRICS_KEY]


# ------------------------------------------------------------ kind 6: offers that cannot carry the caller's voice
@pytest.fixture(scope="module")
def seed() -> str:
    return asyncio.run(seed_offer())


def voiceless(seed: str) -> dict[str, tuple[str, str]]:
    """name → (offer, a word the 400 must contain)."""
    no_fp = edit(seed, r"^a=fingerprint:.*\r\n", "")
    return {
        "inactive": (edit(seed, r"^a=sendrecv$", "a=inactive"), "inactive"),
        "recvonly": (edit(seed, r"^a=sendrecv$", "a=recvonly"), "recvonly"),
        "session-level inactive": (edit(edit(seed, r"^a=sendrecv\r\n", ""), r"^t=0 0$", "t=0 0\r\na=inactive"),
                                   "inactive"),
        "port 0": (edit(seed, r"^m=audio \d+", "m=audio 0"), "port 0"),
        "no fingerprint": (no_fp, "fingerprint"),
        "bad fingerprint hash": (edit(seed, r"^a=fingerprint:sha-256", "a=fingerprint:md5"), "fingerprint"),
        "no ice-ufrag": (edit(seed, r"^a=ice-ufrag:.*\r\n", ""), "ICE"),
        "no ice-pwd": (edit(seed, r"^a=ice-pwd:.*\r\n", ""), "ICE"),
        "short ice-pwd": (edit(seed, r"^a=ice-pwd:.*$", "a=ice-pwd:short"), "ICE"),
        "plain RTP": (edit(seed, r"UDP/TLS/RTP/SAVPF", "RTP/AVP"), "DTLS-SRTP"),
        "no codec": (in_audio(edit(seed, r"^(m=audio \d+ \S+) .*$", r"\1 97"),
                              lambda ls: [x for x in ls if not x.startswith("a=rtpmap")] + ["a=rtpmap:97 iLBC/8000"]),
                     "codec"),
        "bad setup": (edit(seed, r"^a=setup:actpass", "a=setup:holdconn"), "setup"),
    }


def test_offers_without_the_callers_voice_are_refused_before_any_peer_connection(seed):
    assert parse_offer(body(seed)).sdp == seed
    for name, (sdp, word) in voiceless(seed).items():
        with pytest.raises(BadOffer) as refused:
            parse_offer(body(sdp))
        assert refused.value.status == 400 and word in str(refused.value), (name, str(refused.value))
    # what the RFCs allow still passes: the fingerprint and credentials at session level, sendonly audio
    moved = re.compile(r"^a=(fingerprint|ice-ufrag|ice-pwd):[^\r\n]*\r\n", re.MULTILINE)
    session = "".join(dict.fromkeys(m.group(0) for m in moved.finditer(seed)))   # once each
    lifted = moved.sub("", seed)
    assert "a=fingerprint" not in lifted
    parse_offer(body(edit(lifted, r"^t=0 0\r\n", "t=0 0\r\n" + session, count=1)))
    parse_offer(body(edit(seed, r"^a=sendrecv$", "a=sendonly")))


async def test_voiceless_offers_get_400_and_take_no_slot(config, seed):
    one = copy.deepcopy(config)
    one.webrtc.max_calls = 1
    async with App(one) as app:
        for name, (sdp, word) in voiceless(seed).items():
            status, answer = await app.post(body(sdp))
            assert status == 400 and word in answer["error"], (name, answer)
            assert not app.signalling.calls and app.metrics.active_calls() == 0, name
        status, answer = await app.post(body(seed))    # the one slot is still free
        assert status == 200 and answer["type"] == "answer"
        await app.signalling.close_all()
        assert not app.signalling.calls and app.metrics.active_calls() == 0


# ------------------------------------------------------------ kind 10: mutated offers
JUNK = ["", " ", "x", "-1", "99999999999999999999", "0", "abc def", ":::", "\u00e9\u00e9", "1 2 3 4 5 6 7 8",
        "a=b=c", "udp", "None", "%s%n", "\t"]
DIRECTIONS = ["a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv sendonly", "a=rtcp-mux"]


def mutate(sdp: str, rng: random.Random) -> tuple[str, str]:
    lines = sdp.split("\r\n")[:-1]
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        i = rng.randrange(len(lines))
        op = rng.choice(["delete", "duplicate", "truncate", "junk", "reorder", "direction", "junk-attr"])
        ops.append(f"{op}@{i}")
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "truncate":
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == "junk":
            head, sep, _ = lines[i].partition(":") if lines[i].startswith("a=") else lines[i].partition("=")
            tail = " ".join(rng.choice(JUNK) for _ in range(rng.randrange(1, 4)))
            lines[i] = head + (sep or "=") + tail
        elif op == "junk-attr":   # keep the attribute's first field, break the rest
            parts = lines[i].split(" ")
            j = rng.randrange(len(parts))
            parts[j] = rng.choice(JUNK)
            lines[i] = " ".join(parts)
        elif op == "reorder":
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "direction":
            lines[i] = rng.choice(DIRECTIONS)
        if not lines:
            lines = ["v=0"]
    return "\r\n".join(lines) + "\r\n", " ".join(ops)


def fixed_cases(seed: str) -> list[tuple[str, str]]:
    """The field's examples: a bare m=audio, a junk candidate, a missing a=setup; and the SDP's extremes."""
    return [
        ("bare m=audio", "v=0\r\nm=audio\r\n"),
        ("bare m=audio in the seed", edit(seed, r"^m=audio .*$", "m=audio")),
        ("junk candidate", edit(seed, r"^a=candidate:.*$", "a=candidate:junk", count=1)),
        ("short candidate", edit(seed, r"^(a=candidate:\S+ 1 udp \d+ \S+).*$", r"\1", count=1)),
        ("missing a=setup", edit(seed, r"^a=setup:.*\r\n", "")),
        ("no m-line end", seed.replace("\r\n", "\n")),
        ("nul bytes", seed.replace("a=mid:0", "a=mid:\x00")),
        ("huge payload type", edit(seed, r"^(m=audio \d+ \S+) ", r"\1 300 ")),
        ("rtpmap without rate", edit(seed, r"^a=rtpmap:(\d+) opus/48000/2$", r"a=rtpmap:\1 opus")),
        ("fmtp of an unknown payload", edit(seed, r"^a=rtpmap:(\d+) opus/48000/2$", "a=fmtp:77 x\r\n\\g<0>")),
        ("setup junk", edit(seed, r"^a=setup:actpass", "a=setup:", count=1)),
    ]


@pytest.mark.slow   # 400 offers through aiortc (2 s): the fast tier stays under 30 s
async def test_400_mutated_offers_never_get_5xx_and_leave_nothing_behind(config, seed):
    many = copy.deepcopy(config)
    many.webrtc.max_calls = 10_000
    many.admission.max_calls = 10_000   # the process-wide capacity (agent/admission.py) too
    rng = random.Random(FUZZ_SEED)
    cases = fixed_cases(seed) + [mutate(seed, rng)[::-1] for _ in range(FUZZ_OFFERS)]
    before = asyncio.all_tasks()
    statuses: dict[int, int] = {}
    accepted: set[str] = set()
    async with App(many) as app:
        for name, sdp in cases:
            status, answer = await app.post(body(sdp))
            statuses[status] = statuses.get(status, 0) + 1
            assert status == 200 or 400 <= status < 500, (name, status, answer)
            if status == 200:
                accepted.add(answer["call_id"])
            else:
                assert isinstance(answer.get("error"), str) and answer["error"], (name, answer)
            # a refused offer is freed before its response: only accepted ones are listed
            assert set(app.signalling.calls) <= accepted, name
        assert app.metrics.active_calls() == len(app.signalling.calls)
        await app.signalling.close_all()
        assert not app.signalling.calls and app.metrics.active_calls() == 0
    await asyncio.sleep(0.5)   # let aiortc's cancelled tasks unwind
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert not leaked, leaked[:5]
    # the mutations reach both sides: some are still usable offers, most are refused
    assert statuses.get(200, 0) >= 20 and sum(n for s, n in statuses.items() if s >= 400) >= 200, statuses
    assert 500 not in statuses


async def test_an_answered_offer_that_never_connects_is_freed(config, seed):
    quick = copy.deepcopy(config)
    quick.webrtc.connect_timeout_s = 1.0
    async with App(quick) as app:
        # a valid offer whose candidate leads nowhere (the discard port): ICE never completes
        dead = edit(seed, r"^(a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1) \d+", r"\1 9")
        status, answer = await app.post(body(dead))
        assert status == 200
        call = app.signalling.calls[answer["call_id"]]
        async with asyncio.timeout(5):
            while app.signalling.calls:
                await asyncio.sleep(0.05)
        assert call.close_reason == "connect_timeout" and app.metrics.active_calls() == 0
        assert call.pc.connectionState == "closed"
