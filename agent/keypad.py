"""Keypad entry: DTMF digits collected into one caller turn.

Phones send keys (RFC 4733 events, decoded by the SIP transport).  Digits
collect until '#' or until no key came for `TIMEOUT_S`; the entry then
becomes a turn the agent answers like a spoken one, with the text
`as_text()` gives it.  Driven by the caller's frames (`tick`), so it follows
whatever clock the conversation runs on.
"""
from __future__ import annotations

#: seconds without a key that end an entry (the usual IVR inter-digit timeout)
TIMEOUT_S = 2.0


class Keypad:
    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self._digits: list[str] = []
        self._last_key = 0.0

    def press(self, digit: str, now: float) -> str | None:
        """A key at ``now`` (clock seconds); returns the finished entry on '#', else None."""
        if digit == "#":
            return self._take()
        self._digits.append(digit)
        self._last_key = now
        return None

    def tick(self, now: float) -> str | None:
        """The finished entry once `timeout_s` passed since the last key, else None."""
        if self._digits and now - self._last_key >= self.timeout_s:
            return self._take()
        return None

    def _take(self) -> str | None:
        digits, self._digits = "".join(self._digits), []
        return digits or None


def as_text(digits: str) -> str:
    """The caller's turn for an entry, e.g. "42" → "I pressed 4 2 on my keypad."."""
    return f"I pressed {' '.join(digits)} on my keypad."
