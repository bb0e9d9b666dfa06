"""A small reordering jitter buffer for caller audio.

The conversation is not a loudspeaker: it wants each 20 ms frame as soon as
it arrives, stamped with its arrival time, not smoothed onto a playout
clock.  So packets in order pass straight through (no added delay); a gap
holds later packets for at most `max_hold` packets or `max_wait_s`, in case
the missing one was only reordered, and is then declared lost (its frame
becomes silence).  Late packets and duplicates are dropped; a large jump in
sequence numbers (a new stream) restarts the buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_CONCEALED = 10   # a longer loss is a pause: conceal nothing, just resync


@dataclass
class ReorderBuffer:
    max_hold: int = 3
    max_wait_s: float = 0.06
    expected: int | None = None
    lost: int = 0
    late: int = 0
    _held: dict[int, tuple[bytes, float]] = field(default_factory=dict)

    def push(self, seq: int, payload: bytes, arrival: float) -> list[tuple[bytes | None, float]]:
        """Frames now ready, in order: (payload, arrival) or (None, time) for a lost packet."""
        if self.expected is None:
            self.expected = seq
        ahead = (seq - self.expected) & 0xFFFF
        if ahead >= 0x8000:
            self.late += 1
            return []
        if ahead > 3000:
            self.expected, self._held = seq, {}
        self._held[seq] = (payload, arrival)
        out = self._release()
        if len(self._held) > self.max_hold:
            out += self._skip_gap(arrival)
        return out

    def expire(self, now: float) -> list[tuple[bytes | None, float]]:
        """Give up on a missing packet that has been waited for long enough."""
        if self._held and now - min(a for _, a in self._held.values()) >= self.max_wait_s:
            return self._skip_gap(now)
        return []

    def _release(self) -> list[tuple[bytes | None, float]]:
        out: list[tuple[bytes | None, float]] = []
        while self.expected is not None and self.expected in self._held:
            out.append(self._held.pop(self.expected))
            self.expected = (self.expected + 1) & 0xFFFF
        return out

    def _skip_gap(self, now: float) -> list[tuple[bytes | None, float]]:
        assert self.expected is not None   # only called with packets held, so after the first push
        expected = self.expected
        nearest = min(self._held, key=lambda s: (s - expected) & 0xFFFF)
        gap = (nearest - expected) & 0xFFFF
        self.lost += gap
        out: list[tuple[bytes | None, float]] = [(None, now)] * (gap if gap <= MAX_CONCEALED else 0)
        self.expected = nearest
        return out + self._release()
