"""WebRTC signalling: `POST /offer` admits a browser caller, `GET /webrtc/config` tells the page how.

The offer is checked before any peer connection exists (`parse_offer`), so
bad input costs nothing, takes no call slot, and gets a 4xx that says what
is wrong, in terms of the request, never our internals:

* 413 — larger than `MAX_OFFER_BYTES`;
* 400 — not JSON, not an object ``{"sdp": ..., "type": "offer"}``, not SDP;
  an SDP line aiortc's parser (`aiortc.sdp`) refuses (named, with its number);
  no audio section; no audio the caller would *send* (every audio m-line is
  rejected with port 0 or is ``a=recvonly`` / ``a=inactive``: RFC 3264 §5.1,
  §6; the direction defaults to the session's, then sendrecv, RFC 4566 §6);
  not DTLS-SRTP (the profile must be ``UDP/TLS/RTP/SAVPF``, RFC 8834 §4);
  no ICE credentials or malformed ones (``a=ice-ufrag`` 4–256 and
  ``a=ice-pwd`` 22–256 ice-chars, RFC 8839 §5.4); no DTLS certificate
  fingerprint (``a=fingerprint``, session or media level, RFC 8122 §5) or
  one of an unknown hash; a bad ``a=setup`` (RFC 4145 §4); no audio codec
  we can decode (Opus, PCMU, PCMA, G722).

A caller the process's `Admission` refuses (the server draining, capacity full,
`webrtc.max_calls` reached, or engine queues saturated: agent/admission.py) gets
503 with Retry-After and ``{"error": ..., "reason": "draining" | "full" |
"transport_full" | "saturated"}`` before any peer connection exists; an admitted offer holds its
slot while it is answered, and the call until it closes.  An offer that
aiortc still refuses while answering is a 400 too, and its call is closed at
once (peer connection included) before the response goes out.  An answered
call that never connects is closed after `webrtc.connect_timeout_s`
(media/webrtc/call.py).  The detail of any refusal is logged once, at INFO;
an unexpected exception is logged with its traceback and answered 500 with
no detail (a bug: the fuzz test in tests/test_webrtc_offers.py keeps it at 0).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.sdp import SessionDescription

from sub300.agent.admission import Admission, Refusal, Ticket
from sub300.agent.auth.limits import CallSlot
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.calls import CallContext, CallObserver
from sub300.agent.config import Config
from sub300.agent.engines import Engines
from sub300.media.webrtc.call import WebRtcCall
from sub300.media.webrtc.ice import allow_loopback_when_alone

from .auth import CALL_SLOT, PRINCIPAL, page_auth, page_ice_servers, server_rtc_configuration

log = logging.getLogger(__name__)
#: a browser's audio+data offer is 3–6 kB; this leaves room for many candidates
MAX_OFFER_BYTES = 64 * 1024
#: how much of a caller's bad SDP line a 400 quotes back
_QUOTE_CHARS = 80

#: what aiortc raises for an offer it cannot parse or negotiate (no common codec, no ICE credentials, …);
#: aiortc's SDP parser also uses ``assert`` and ``next()`` on what it reads
_OFFER_ERRORS = (ValueError, TypeError, KeyError, IndexError, AssertionError, AttributeError, StopIteration,
                 InternalError, InvalidAccessError, InvalidStateError, OperationError)
#: aiortc's own exceptions carry sentences meant for the application ("... is missing"); quoted in a 400
_AIORTC_ERRORS = (InvalidAccessError, InvalidStateError, OperationError)
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_SENDING = ("sendrecv", "sendonly")          # the offerer sends: the caller's voice can reach us
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")   # ice-char, RFC 8839 §5.4
#: hash functions aiortc/pyOpenSSL can check a DTLS certificate with (RFC 8122 §5 names, lower case)
_FINGERPRINT_HASHES = ("sha-1", "sha-224", "sha-256", "sha-384", "sha-512")
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+")
_SETUP = ("actpass", "active", "passive")
#: the audio codecs aiortc decodes (RTP payload names, RFC 3551 static types 0, 8, 9 without an rtpmap)
_CODECS = ("opus", "pcmu", "pcma", "g722")
_STATIC_AUDIO = {0: "pcmu", 8: "pcma", 9: "g722"}


class BadOffer(ValueError):
    """An offer refused before any peer connection exists: ``status`` (4xx) and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _quote(line: str) -> str:
    line = line.strip()
    return repr(line if len(line) <= _QUOTE_CHARS else line[:_QUOTE_CHARS] + "…")


def _parse_sdp(sdp: str) -> SessionDescription:
    """aiortc's parser, with its failure turned into a BadOffer naming the first line it refuses."""
    lines = sdp.splitlines()
    try:
        return SessionDescription.parse(sdp)
    except _OFFER_ERRORS as error:
        log.info("offer refused by the SDP parser: %s: %s", type(error).__name__, error)
    bad = None
    if len(lines) <= 400:   # find the line: the shortest prefix that fails (each prefix parses alone)
        for n in range(1, len(lines) + 1):
            try:
                SessionDescription.parse("\r\n".join(lines[:n]) + "\r\n")
            except _OFFER_ERRORS:
                bad = n
                break
    where = f"line {bad}: {_quote(lines[bad - 1])}" if bad else "a line it could not read"
    raise BadOffer(400, f"the offer's SDP is malformed at {where}")


def _attributes(lines: list[str]) -> dict[str, list[str]]:
    """``a=name:value`` lines → {name: [value, ...]} (a flag such as ``a=sendrecv`` has the value "")."""
    attrs: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("a="):
            name, _, value = line[2:].strip().partition(":")
            attrs.setdefault(name, []).append(value.strip())
    return attrs


def _sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    """The session's lines and each media section's lines (its m= line first)."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def _direction(attrs: dict[str, list[str]], session: dict[str, list[str]]) -> str:
    for source in (attrs, session):
        found = [d for d in _DIRECTIONS if d in source]
        if found:
            return found[-1]
    return "sendrecv"


def _check_transport(name: str, lines: list[str], session: dict[str, list[str]]) -> str | None:
    """Why a media section (not rejected) cannot be negotiated: its mid, ICE and DTLS lines; or None."""
    attrs = _attributes(lines[1:])
    ufrag = (attrs.get("ice-ufrag") or session.get("ice-ufrag") or [""])[-1]
    pwd = (attrs.get("ice-pwd") or session.get("ice-pwd") or [""])[-1]
    if not ufrag or not pwd:
        return f"the {name} has no ICE credentials (a=ice-ufrag and a=ice-pwd)"
    if not (4 <= len(ufrag) <= 256 and 22 <= len(pwd) <= 256
            and _ICE_CHARS.fullmatch(ufrag) and _ICE_CHARS.fullmatch(pwd)):
        return (f"the {name} has malformed ICE credentials (a=ice-ufrag: 4-256 and a=ice-pwd: 22-256 "
                "characters of A-Z a-z 0-9 + /)")
    fingerprints = attrs.get("fingerprint", []) + session.get("fingerprint", [])
    if not fingerprints:
        return f"the {name} has no DTLS certificate fingerprint (a=fingerprint)"
    for value in fingerprints:
        parts = value.split()
        if (len(parts) != 2 or parts[0].lower() not in _FINGERPRINT_HASHES
                or not _FINGERPRINT.fullmatch(parts[1])):
            return (f"the {name} has a malformed a=fingerprint {_quote(value)} "
                    f"(expected one of {', '.join(_FINGERPRINT_HASHES)} then hex bytes joined by ':')")
    setup = (attrs.get("setup") or session.get("setup") or [""])[-1]
    if setup not in _SETUP:
        return (f"the {name} has a=setup:{setup[:20]}" if setup else f"the {name} has no a=setup") + \
            "; an offer must say a=setup:actpass (RFC 5763 §5)"
    if not attrs.get("mid") or not attrs["mid"][0]:
        return f"the {name} has no a=mid (JSEP, RFC 8829 §5.2.1: every media section has one)"
    return None


def _check_audio(name: str, lines: list[str], session: dict[str, list[str]]) -> str | None:
    """Why an audio section cannot carry a WebRTC caller's voice to us, or None."""
    m_line = lines[0].split()
    attrs = _attributes(lines[1:])
    direction = _direction(attrs, session)
    if direction not in _SENDING:
        return (f"the {name} is a={direction}: the caller would send no audio "
                "(offer a=sendrecv with a microphone track)")
    if "SAVP" not in m_line[2] or not m_line[2].startswith("UDP/TLS"):
        return f"the {name} uses {m_line[2][:40]}: WebRTC audio needs DTLS-SRTP (UDP/TLS/RTP/SAVPF)"
    if "rtcp-mux" not in attrs:
        return f"the {name} has no a=rtcp-mux (WebRTC sends RTP and RTCP on one port, RFC 5761)"
    names = {_STATIC_AUDIO.get(int(pt), "") for pt in m_line[3:] if pt.isdigit()}
    for rtpmap in attrs.get("rtpmap", []):
        pt, _, desc = rtpmap.partition(" ")
        if pt in m_line[3:]:
            names.add(desc.split("/")[0].lower())
    if not names & set(_CODECS):
        return f"the {name} offers no audio codec we can decode (one of Opus, PCMU, PCMA, G722)"
    return None


def _check_sections(session_lines: list[str], sections: list[list[str]]) -> list[str]:
    """The offer's media sections, each a direction explicit (RFC 4566 §6: the session's, else sendrecv),
    or BadOffer: a section that cannot be negotiated, or no audio section that can carry the caller's voice."""
    session = _attributes(session_lines)
    mids: list[str] = []
    voice: list[str | None] = []
    out = list(session_lines)
    for i, lines in enumerate(sections, start=1):
        m_line = lines[0].split()
        kind = m_line[0][2:] if m_line else "?"
        name = f"{kind} section (m-line {i})"
        if len(m_line) < 4 or not m_line[1].isdigit():
            raise BadOffer(400, f"the m-line {i} is malformed: {_quote(lines[0])}")
        attrs = _attributes(lines[1:])
        if m_line[1] == "0" and "bundle-only" not in attrs:   # rejected (RFC 3264 §6)
            mids += attrs.get("mid", [])[:1]
            if kind == "audio":
                voice.append(f"the {name} is rejected (port 0)")
            out += lines
            continue
        if (problem := _check_transport(name, lines, session)) is not None:
            raise BadOffer(400, problem)
        mid = attrs["mid"][0]
        if mid in mids:
            raise BadOffer(400, f"a=mid:{mid[:20]} names two media sections")
        mids.append(mid)
        if kind == "audio":
            voice.append(_check_audio(name, lines, session))
            if not any(d in attrs for d in _DIRECTIONS):
                lines = [*lines, f"a={_direction(attrs, session)}"]
        out += lines
    if not voice:
        raise BadOffer(400, "the offer has no audio section; the caller must send a microphone track")
    if all(voice):
        raise BadOffer(400, str(voice[0]) if len(voice) == 1 else
                       "no audio section can carry the caller's voice: " + "; ".join(map(str, voice)))
    for group in session.get("group", []):
        kind, *members = group.split() or [""]
        missing = [m for m in members if m not in mids]
        if kind == "BUNDLE" and missing:
            raise BadOffer(400, f"a=group:BUNDLE names {missing[0][:20]!r}, which no media section has as a=mid")
    return out


def parse_offer(raw: bytes) -> RTCSessionDescription:
    """A request body → the caller's offer, or `BadOffer` (4xx and why) before any peer connection exists.

    ``raw``: the body, at most `MAX_OFFER_BYTES`, JSON ``{"sdp": str, "type": "offer"}``.  The checks
    are listed in the module docstring; an offer passes if one audio section passes them all.
    """
    if len(raw) > MAX_OFFER_BYTES:
        raise BadOffer(413, f"offer too large ({len(raw)} bytes; at most {MAX_OFFER_BYTES})")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadOffer(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadOffer(400, 'body must be a JSON object {"sdp": ..., "type": "offer"}')
    sdp, kind = body.get("sdp"), body.get("type")
    if kind != "offer":
        shown = kind if isinstance(kind, str) and len(kind) <= 20 else type(kind).__name__
        raise BadOffer(400, f'"type" must be "offer", got {shown!r}')
    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        raise BadOffer(400, '"sdp" must be an SDP session description (starting with "v=0")')
    session_lines, sections = _sections(sdp)
    media = [section[0].split()[0][2:] if section[0].split() else "?" for section in sections]
    if "audio" not in media:
        raise BadOffer(400, f"the offer has no audio section (media: {', '.join(media) or 'none'}); "
                            "the caller must send a microphone track")
    _parse_sdp(sdp)
    lines = _check_sections(session_lines, sections)
    sdp = "\r\n".join(lines) + "\r\n"
    return RTCSessionDescription(sdp=sdp, type="offer")


class Signalling:
    """The live browser calls of one app, and the routes that create them."""

    def __init__(self, config: Config, engines: Engines, observer: CallObserver,
                 admission: Admission | None = None, behaviour: Behaviour = DEFAULT_BEHAVIOUR) -> None:
        self.config = config
        self.engines = engines
        self.behaviour = behaviour
        self.observer = observer
        #: shared with SIP under `sub300 serve`; alone, ``webrtc.max_calls`` is the limit
        self.admission = admission or Admission.per_transport("webrtc", config.webrtc.max_calls)
        self.calls: dict[str, WebRtcCall] = {}
        self._tickets: dict[str, Ticket] = {}   # call id → its admission slot, released when the call is forgotten
        self._slots: dict[str, CallSlot] = {}      # call id → its calls-at-once slot (web/auth.py), released with it
        allow_loopback_when_alone()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/webrtc/config", self.page_config)
        app.on_shutdown.append(self._on_shutdown)

    async def page_config(self, request: web.Request) -> web.Response:
        return web.json_response({
            "iceServers": page_ice_servers(request, self.config.webrtc),
            "budget_ms": self.config.budget_ms,
            "engines": self.engines.describe(),
            "auth": page_auth(request),
        })

    async def offer(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return _error(413, f"offer too large ({request.content_length} bytes; at most {MAX_OFFER_BYTES})")
        try:
            raw = await request.content.read(MAX_OFFER_BYTES + 1)
            offer = parse_offer(raw)
        except BadOffer as bad:
            return _error(bad.status, str(bad))
        ticket = self.admission.try_admit("webrtc")
        if isinstance(ticket, Refusal):
            return web.json_response({"error": ticket.message, "reason": ticket.reason}, status=503,
                                     headers={"Retry-After": str(ticket.retry_after_s)})
        principal = request.get(PRINCIPAL)   # web/auth.py; absent on an app without authentication
        context = CallContext(
            key_id=principal.key_id if principal is not None else None,
            source=principal.source if principal is not None else request.remote,
            record_audio=(principal is not None and principal.record_audio) or self.config.records.record_audio)
        slot = request.pop(CALL_SLOT, None)   # now ours: released with the call, or below
        try:
            return await self._answer(offer, ticket, context, slot)
        finally:
            if not any(t is ticket for t in self._tickets.values()):
                ticket.release()   # never answered: the slot goes back now (an answered call's goes with it)
            if slot is not None and not any(s is slot for s in self._slots.values()):
                slot.release()

    async def _answer(self, offer: RTCSessionDescription, ticket: Ticket, context: CallContext | None = None,
                      slot: CallSlot | None = None) -> web.Response:
        call_id = uuid.uuid4().hex[:12]
        pc = RTCPeerConnection(server_rtc_configuration(self.config.webrtc))
        call = WebRtcCall(call_id, pc, self.engines, self.config, self.observer, on_closed=self._forget,
                          behaviour=self.behaviour,
                          context=context)
        self.calls[call_id] = call
        self._tickets[call_id] = ticket
        if slot is not None:
            self._slots[call_id] = slot
        try:
            answer = await call.accept(offer)
        except asyncio.CancelledError:  # the client went away while we answered
            await call.close("signalling cancelled")
            raise
        except _OFFER_ERRORS as exc:  # aiortc refused it while negotiating
            log.info("call %s: offer refused while answering: %s: %s", call_id, type(exc).__name__, exc)
            await call.close("bad offer")
            detail = str(exc).strip()
            if isinstance(exc, _AIORTC_ERRORS) and detail and len(detail) <= 200:
                return _error(400, f"cannot use this offer: {detail}")
            return _error(400, "cannot use this offer: it could not be negotiated (audio, ICE and DTLS)")
        except Exception:
            log.exception("answering offer for call %s failed", call_id)
            await call.close("error")
            return _error(500, f"internal error while answering (call {call_id}; see the server log)")
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "call_id": call_id})

    def _forget(self, call: WebRtcCall) -> None:
        self.calls.pop(call.call_id, None)
        ticket = self._tickets.pop(call.call_id, None)
        if ticket is not None:
            ticket.release()
        slot = self._slots.pop(call.call_id, None)
        if slot is not None:
            slot.release()

    async def close_all(self, reason: str = "shutdown") -> None:
        calls = list(self.calls.values())
        results = await asyncio.gather(*(call.close(reason) for call in calls), return_exceptions=True)
        for call, result in zip(calls, results, strict=True):   # one failed close must not hide (nor stop) the others
            if isinstance(result, Exception):
                log.error("closing WebRTC call %s failed: %s: %s", call.call_id, type(result).__name__, result,
                          exc_info=result)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close_all()


def describe_calls(signalling: Signalling) -> list[dict[str, Any]]:
    return [{"call_id": c.call_id, "state": c.conversation.state.value, "connection": c.pc.connectionState}
            for c in signalling.calls.values()]
