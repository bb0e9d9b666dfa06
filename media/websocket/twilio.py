"""Twilio Media Streams, the WebSocket protocol: parse what the provider sends, build what we send back.

Source: Twilio's "Media Streams - WebSocket Messages"
(https://www.twilio.com/docs/voice/media-streams/websocket-messages) and
"TwiML Voice: <Stream>" (https://www.twilio.com/docs/voice/twiml/stream).
A bidirectional stream (``<Connect><Stream url="wss://…"/>``) is one
WebSocket of JSON text messages, each with an ``event`` discriminator:

from the provider
  ``connected`` {protocol, version} — first, once;
  ``start`` {sequenceNumber, start: {streamSid, accountSid, callSid, tracks,
  customParameters, mediaFormat: {encoding "audio/x-mulaw", sampleRate 8000,
  channels 1}}, streamSid} — once, before any media;
  ``media`` {media: {track "inbound", chunk, timestamp (ms since the stream
  started), payload: base64 μ-law 8 kHz, 20 ms per message}};
  ``mark`` {mark: {name}} — the audio we sent before our mark of that name
  has played (or was dropped by our ``clear``);
  ``dtmf`` {dtmf: {track "inbound_track", digit}};
  ``stop`` {stop: {accountSid, callSid}} — last.
to the provider
  ``media`` {streamSid, media: {payload}} — base64 μ-law 8 kHz, buffered and
  played in order; ``mark`` {streamSid, mark: {name}}; ``clear`` {streamSid}
  — drop everything buffered (the provider echoes the marks still pending).

The ``<Stream url>`` takes no query string (TwiML <Stream> docs: custom
key/value pairs go in ``<Parameter name=… value=…/>``, which arrive in
``start.customParameters``): a call token rides there, as ``token``.

Telnyx and Plivo use the same shape (Telnyx's ``stream_id``/``sequence_number``
spellings are not accepted here).  Everything the provider sends is checked:
a malformed message raises `ProtocolError` (the caller logs and ignores it).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

#: what a start's mediaFormat must say (Twilio sends exactly this for a phone call)
ENCODING = "audio/x-mulaw"
RATE = 8000
#: a media payload longer than this (1 s of μ-law) is refused; Twilio sends 160 bytes (20 ms)
MAX_PAYLOAD_BYTES = 8000
#: customParameters kept at most, and the longest key / value (a token is ~250 characters)
MAX_PARAMETERS = 32
MAX_PARAMETER_CHARS = 2048
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class ProtocolError(ValueError):
    """A message that is not valid Twilio Media Streams JSON; the message says what is wrong."""


@dataclass(frozen=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    track: str
    payload: bytes     # μ-law bytes, 8 kHz
    timestamp_ms: int | None


@dataclass(frozen=True)
class Mark:
    name: str


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Stop:
    call_sid: str


Message = Connected | Start | Media | Mark | Dtmf | Stop


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _text(value: Any, what: str, *, limit: int = 256, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise ProtocolError(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def parse(text: str | bytes) -> Message:
    """One text message from the provider → its event, or `ProtocolError`."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("not JSON") from None
    data = _object(data, "a message")
    event = data.get("event")
    if event == "media":
        media = _object(data.get("media"), "media")
        payload = media.get("payload")
        if not isinstance(payload, str) or not payload:
            raise ProtocolError("media.payload must be a non-empty base64 string")
        if len(payload) > MAX_PAYLOAD_BYTES * 4 // 3 + 4:
            raise ProtocolError(f"media.payload longer than {MAX_PAYLOAD_BYTES} bytes")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("media.payload is not valid base64") from None
        stamp = media.get("timestamp")
        try:
            timestamp = int(stamp) if stamp is not None else None
        except (TypeError, ValueError):
            raise ProtocolError("media.timestamp must be milliseconds") from None
        track = media.get("track", "inbound")
        return Media(_text(track, "media.track", limit=32), audio, timestamp)
    if event == "mark":
        return Mark(_text(_object(data.get("mark"), "mark").get("name"), "mark.name"))
    if event == "start":
        start = _object(data.get("start"), "start")
        fmt = _object(start.get("mediaFormat", {"encoding": ENCODING, "sampleRate": RATE, "channels": 1}),
                      "start.mediaFormat")
        if (fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)) != (ENCODING, RATE, 1):
            raise ProtocolError(f"start.mediaFormat must be {ENCODING} {RATE} Hz mono, not "
                                f"{str(fmt.get('encoding'))[:40]} {str(fmt.get('sampleRate'))[:10]} Hz "
                                f"{str(fmt.get('channels'))[:4]} channel(s)")
        params = start.get("customParameters") or {}
        params = _object(params, "start.customParameters")
        if len(params) > MAX_PARAMETERS or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_PARAMETER_CHARS
                and len(v) <= MAX_PARAMETER_CHARS for k, v in params.items()):
            raise ProtocolError(f"start.customParameters must map at most {MAX_PARAMETERS} names to strings")
        tracks = start.get("tracks", ["inbound"])
        if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
            raise ProtocolError("start.tracks must be a list of strings")
        return Start(_text(start.get("streamSid") or data.get("streamSid"), "start.streamSid"),
                     _text(start.get("callSid"), "start.callSid", required=False),
                     _text(start.get("accountSid"), "start.accountSid", required=False),
                     tuple(t[:32] for t in tracks[:4]), dict(params))
    if event == "dtmf":
        digit = _object(data.get("dtmf"), "dtmf").get("digit")
        if not isinstance(digit, str) or digit not in DTMF_DIGITS:
            raise ProtocolError("dtmf.digit must be one of 0-9 * # A-D")
        return Dtmf(digit)
    if event == "stop":
        stop = data.get("stop")
        call_sid = _object(stop, "stop").get("callSid") if stop is not None else None
        return Stop(_text(call_sid, "stop.callSid", required=False))
    if event == "connected":
        return Connected(_text(data.get("protocol", ""), "protocol", required=False),
                         _text(data.get("version", ""), "version", required=False))
    shown = event[:32] if isinstance(event, str) else type(event).__name__
    raise ProtocolError(f"unknown event {shown!r}")


# ------------------------------------------------------------------ to the provider
def media_message(stream_sid: str, ulaw: bytes) -> str:
    """Agent audio (μ-law 8 kHz bytes) for the provider to play."""
    return json.dumps({"event": "media", "streamSid": stream_sid,
                       "media": {"payload": base64.b64encode(ulaw).decode("ascii")}})


def mark_message(stream_sid: str, name: str) -> str:
    """Ask the provider to echo ``name`` once the audio sent before it has played."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """Drop the audio the provider still buffers (barge-in)."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})
