"""SDP offer/answer for one G.711 audio stream (RFC 3264, RFC 4566, RFC 4733).

We answer the first audio m-line whose offer holds a codec we accept (in the
offerer's order of preference), keep telephone-event if offered, and reject
every other m-line with port 0, as RFC 3264 requires.  No codec in common →
`NoCommonCodec` (the INVITE gets 488).

Hold (RFC 3264 §8.4): an offer whose stream is ``sendonly`` or ``inactive``
(at session or media level), or whose connection address is ``0.0.0.0``
(the RFC 2543 style, which §8.4 says means "neither RTP nor RTCP is to be
sent to the peer"), puts the call on hold; the answer mirrors it
(``recvonly`` to ``sendonly``, ``inactive`` to ``inactive``, and to a
``0.0.0.0`` offer we answer that we do not send).  `AudioParams.held` says
whether the agent must keep quiet.
"""
from __future__ import annotations

import ipaddress
import itertools
import random
from dataclasses import dataclass, field

from .g711 import PAYLOAD_TYPES

_DIRECTIONS = {"sendrecv", "sendonly", "recvonly", "inactive"}
_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
TELEPHONE_EVENT_PT = 101   # what we offer when we make the offer


class SdpError(ValueError):
    """The body is not SDP we can read."""


class NoCommonCodec(SdpError):
    """No audio stream in the offer carries a codec we accept."""


@dataclass
class MediaLine:
    media: str
    port: int
    proto: str
    formats: list[str]
    connection: str | None = None
    rtpmap: dict[int, str] = field(default_factory=dict)   # pt → "PCMU/8000"
    direction: str | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class SessionDescription:
    connection: str | None
    direction: str
    media: list[MediaLine]


@dataclass(frozen=True)
class AudioParams:
    """What was agreed for the call's audio stream."""

    remote_host: str
    remote_port: int
    codec: str                 # PCMU | PCMA
    payload_type: int
    dtmf_payload_type: int | None
    direction: str             # our direction: sendrecv | sendonly | recvonly | inactive

    @property
    def on_hold(self) -> bool:
        """The remote address is the RFC 2543 hold address (``0.0.0.0``/``::``) or port 0: send nothing."""
        return is_unspecified(self.remote_host) or self.remote_port == 0

    @property
    def held(self) -> bool:
        """The far end does not listen to us (we may not send, RFC 3264 §8.4): the agent must pause."""
        return self.on_hold or self.direction in ("recvonly", "inactive")


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` or ``::`` (any spelling): the RFC 2543 hold address."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def answer_direction(their: str, host: str) -> str:
    """Our direction for an offer's direction ``their`` (RFC 3264 §6.1) and connection ``host``.

    A ``0.0.0.0`` offer (RFC 2543 hold, RFC 3264 §8.4) means we must not
    send: ``sendrecv`` → ``recvonly``, ``recvonly`` → ``inactive``.
    """
    ours = _REVERSE[their]
    if is_unspecified(host):
        ours = {"sendrecv": "recvonly", "sendonly": "inactive"}.get(ours, ours)
    return ours


def parse(body: bytes) -> SessionDescription:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError("SDP is not UTF-8") from None
    connection, direction = None, "sendrecv"
    media: list[MediaLine] = []
    for raw in text.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        current = media[-1] if media else None
        if kind == "m":
            parts = value.split()
            if len(parts) < 4:
                raise SdpError(f"bad m-line {value!r}")
            try:
                port = int(parts[1].split("/")[0])
            except ValueError:
                raise SdpError(f"bad port in m-line {value!r}") from None
            media.append(MediaLine(parts[0], port, parts[2], parts[3:]))
        elif kind == "c":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"bad c-line {value!r}")
            address = parts[2].split("/")[0]
            if current is None:
                connection = address
            else:
                current.connection = address
        elif kind == "a":
            name, _, rest = value.partition(":")
            if name in _DIRECTIONS:
                if current is None:
                    direction = name
                else:
                    current.direction = name
            elif name == "rtpmap" and current is not None:
                pt, _, encoding = rest.partition(" ")
                try:
                    current.rtpmap[int(pt)] = encoding.strip()
                except ValueError:
                    raise SdpError(f"bad rtpmap {rest!r}") from None
            if current is not None:
                current.lines.append(line)
    if not media:
        raise SdpError("SDP has no m-line")
    return SessionDescription(connection, direction, media)


def _codec_of(m: MediaLine, fmt: str) -> str | None:
    try:
        pt = int(fmt)
    except ValueError:
        return None
    encoding = m.rtpmap.get(pt)
    if encoding is None:   # static payload types need no rtpmap
        return {v: k for k, v in PAYLOAD_TYPES.items()}.get(pt)
    name, _, rate = encoding.partition("/")
    name = name.upper()
    if name in PAYLOAD_TYPES and rate.split("/")[0] == "8000":
        return name
    return None


def negotiate(offer: SessionDescription, codecs: list[str]) -> tuple[int, AudioParams]:
    """(index of the m-line we answer, what was agreed) or NoCommonCodec."""
    for index, m in enumerate(offer.media):
        if m.media != "audio" or m.port == 0 or "RTP/AVP" not in m.proto:
            continue
        chosen = None
        for fmt in m.formats:
            codec = _codec_of(m, fmt)
            if codec in codecs:
                chosen = (codec, int(fmt))
                break
        if chosen is None:
            continue
        dtmf = next((pt for pt, enc in m.rtpmap.items()
                     if enc.lower().startswith("telephone-event/8000") and str(pt) in m.formats), None)
        host = m.connection or offer.connection
        if host is None:
            raise SdpError("SDP has no connection address")
        their = m.direction or offer.direction
        return index, AudioParams(host, m.port, chosen[0], chosen[1], dtmf, answer_direction(their, host))
    raise NoCommonCodec("no audio stream with " + "/".join(codecs))


_session_ids = itertools.count(random.randrange(1 << 30))


@dataclass
class LocalDescription:
    """Our side of the session: kept per call so re-offers bump the version."""

    address: str
    port: int
    session_id: int = field(default_factory=lambda: next(_session_ids))
    version: int = 0

    def _header(self) -> list[str]:
        self.version += 1
        family = "IP6" if ":" in self.address else "IP4"
        return ["v=0", f"o=sub300 {self.session_id} {self.version} IN {family} {self.address}", "s=sub300",
                f"c=IN {family} {self.address}", "t=0 0"]

    def answer(self, offer: SessionDescription, index: int, params: AudioParams) -> bytes:
        lines = self._header()
        for i, m in enumerate(offer.media):
            if i != index:
                lines.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats)}")
                continue
            fmts = [str(params.payload_type)] + ([str(params.dtmf_payload_type)] if params.dtmf_payload_type is not None else [])
            lines.append(f"m=audio {self.port} RTP/AVP {' '.join(fmts)}")
            lines.append(f"a=rtpmap:{params.payload_type} {params.codec}/8000")
            if params.dtmf_payload_type is not None:
                lines += [f"a=rtpmap:{params.dtmf_payload_type} telephone-event/8000",
                          f"a=fmtp:{params.dtmf_payload_type} 0-16"]
            lines += ["a=ptime:20", f"a={params.direction}"]
        return ("\r\n".join(lines) + "\r\n").encode()

    def offer(self, codecs: list[str]) -> bytes:
        """For an INVITE without SDP: we offer, the ACK answers."""
        lines = self._header()
        pts = [PAYLOAD_TYPES[c] for c in codecs]
        lines.append(f"m=audio {self.port} RTP/AVP {' '.join(map(str, pts))} {TELEPHONE_EVENT_PT}")
        lines += [f"a=rtpmap:{PAYLOAD_TYPES[c]} {c}/8000" for c in codecs]
        lines += [f"a=rtpmap:{TELEPHONE_EVENT_PT} telephone-event/8000", f"a=fmtp:{TELEPHONE_EVENT_PT} 0-16",
                  "a=ptime:20", "a=sendrecv"]
        return ("\r\n".join(lines) + "\r\n").encode()
