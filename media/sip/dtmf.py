"""DTMF from the caller's keypad: RFC 4733 telephone-events in RTP, or SIP INFO.

An RFC 4733 event is sent as several packets with one RTP timestamp (and
its end packet three times), so a digit is reported once per timestamp, on
its first packet: the agent hears the key as soon as it is pressed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DIGITS = "0123456789*#ABCD"


@dataclass(frozen=True)
class DtmfReceived:
    """A key the caller pressed; handed to the call's event listener like a conversation event."""

    digit: str
    source: str        # rfc4733 | info
    kind: str = "dtmf"


class TelephoneEvents:
    def __init__(self) -> None:
        self._last_timestamp: int | None = None

    def feed(self, payload: bytes, timestamp: int) -> str | None:
        """The digit when this packet starts a new event, else None."""
        if len(payload) < 4 or payload[0] >= len(DIGITS):
            return None   # flash and other events are not digits
        if timestamp == self._last_timestamp:
            return None
        self._last_timestamp = timestamp
        return DIGITS[payload[0]]


_INFO_SIGNAL = re.compile(r"^\s*Signal\s*=\s*([0-9*#A-Da-d])\s*$", re.MULTILINE)


def digit_from_info(content_type: str | None, body: bytes) -> str | None:
    """SIP INFO with application/dtmf-relay (`Signal=5`) or application/dtmf (`5`)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    text = body.decode("utf-8", "replace")
    if ctype == "application/dtmf-relay":
        match = _INFO_SIGNAL.search(text)
        return match.group(1).upper() if match else None
    if ctype == "application/dtmf":
        text = text.strip()
        if text.isdigit() and int(text) < len(DIGITS):
            return DIGITS[int(text)]
        return text.upper() if len(text) == 1 and text.upper() in DIGITS else None
    return None
