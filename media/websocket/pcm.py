"""The plain PCM WebSocket for custom clients: raw 16-bit audio in binary frames, JSON events in text frames.

``/ws/pcm?rate=16000``: 16-bit signed little-endian mono PCM both ways, at
the rate of the query string (`parse_rate`: 8000-48000 Hz, a multiple of 50
so 20 ms is a whole number of samples; absent: 16000).  A binary frame from
the client is caller audio of any length (an even number of bytes, at most
1 s); the client sends its microphone continuously, silence included (a
client that sends nothing for 10 s is taken as gone).  The server sends the
agent's audio as binary frames of 20 ms, in real time (one frame per 20 ms
tick: nothing is sent ahead, so what was sent is what the client is about
to play).  Text frames from the server are JSON: ``{"kind": "hello",
"call_id", "rate", "budget_ms"}`` first, then the conversation's events exactly
as the WebRTC data channel carries them (``event_to_dict``; their ``kind``:
``state``, ``transcript``, ``agent_text``, ``tool_called``, ``turn`` with its
ledger, ``turn_failed``, ``barge_in``, ``hangup``, …), and
``{"kind": "clear"}`` when the caller barges in: the client drops the agent
audio it still buffers.  Text frames from the client: ``{"type": "hangup"}``
and ``{"type": "dtmf", "digit": "5"}``; anything else is logged and ignored.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

MIN_RATE, MAX_RATE, DEFAULT_RATE = 8000, 48000, 16000
#: a binary frame longer than this much audio is refused
MAX_FRAME_S = 1.0
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class BadRate(ValueError):
    """The ``rate`` query parameter is missing a usable value; the message says what is allowed."""


class ProtocolError(ValueError):
    """A frame from the client that breaks the protocol; the message says how."""


def parse_rate(value: str | None) -> int:
    """``?rate=`` → Hz, or `BadRate`."""
    if value is None or value == "":
        return DEFAULT_RATE
    if not value.isdigit() or not MIN_RATE <= int(value) <= MAX_RATE or int(value) % 50:
        raise BadRate(f"rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, a multiple of 50 "
                      f"(got {value[:12]!r})")
    return int(value)


def decode_frame(data: bytes, rate: int) -> np.ndarray:
    """A binary frame → int16 samples, or `ProtocolError` (odd length, empty, longer than `MAX_FRAME_S`)."""
    if not data or len(data) % 2:
        raise ProtocolError(f"a binary frame must hold whole 16-bit samples (got {len(data)} bytes)")
    if len(data) > 2 * rate * MAX_FRAME_S:
        raise ProtocolError(f"a binary frame holds at most {MAX_FRAME_S:g} s of audio (got {len(data)} bytes)")
    return np.frombuffer(data, "<i2").astype(np.int16)


def encode_frame(pcm: np.ndarray) -> bytes:
    return np.asarray(pcm, np.int16).astype("<i2").tobytes()


def parse_text(text: str) -> dict[str, Any]:
    """A text frame from the client → ``{"type": "hangup"}`` or ``{"type": "dtmf", "digit": d}``."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("a text frame must be JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("a text frame must be a JSON object")
    kind = data.get("type")
    if kind == "hangup":
        return {"type": "hangup"}
    if kind == "dtmf":
        digit = data.get("digit")
        if not isinstance(digit, str) or digit not in DTMF_DIGITS:
            raise ProtocolError("dtmf.digit must be one of 0-9 * # A-D")
        return {"type": "dtmf", "digit": digit}
    shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
    raise ProtocolError(f"unknown message type {shown!r}")


def clear_message() -> str:
    return json.dumps({"kind": "clear"})


def event_message(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)
