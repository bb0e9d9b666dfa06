"""A small reordering jitter buffer for caller audio.

The conversation is not a loudspeaker: it wants each 20 ms frame as soon as
it arrives, stamped with its arrival time, not smoothed onto a playout
clock.  So packets in order pass straight through (no added delay); a gap
holds later packets for at most `max_hold` packets or `max_wait_s`, in case
the missing one was only reordered, and is then declared lost (its frame
becomes silence).  Late packets and duplicates are dropped; a large jump in
sequence numbers (a new stream) restarts the buffer.

Bounded whatever arrives: at most ``max_hold + 1`` packets are held (a
flood of out-of-order packets skips gaps, it never queues), and lost packets
are concealed only as far as the arrival clock has moved — a burst cannot
make up more silence than the time it took to arrive (one frame per
`FRAME_S` since the last frame went out, at most `MAX_CONCEALED`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_CONCEALED = 10   # a longer loss is a pause: conceal nothing, just resync
FRAME_S = 0.020      # one packet's audio (ptime 20, RFC 3551 §4.5)


@dataclass
class ReorderBuffer:
    max_hold: int = 3
    max_wait_s: float = 0.06
    expected: int | None = None
    lost: int = 0
    late: int = 0
    _held: dict[int, tuple[bytes, float]] = field(default_factory=dict)
    _last_out: float | None = None    # arrival time of the last frame released

    def __len__(self) -> int:
        """Packets held, waiting for a missing one (never more than ``max_hold + 1``)."""
        return len(self._held)

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
        if out:
            self._last_out = out[-1][1]
        return out

    def _skip_gap(self, now: float) -> list[tuple[bytes | None, float]]:
        assert self.expected is not None   # only called with packets held, so after the first push
        expected = self.expected
        nearest = min(self._held, key=lambda s: (s - expected) & 0xFFFF)
        gap = (nearest - expected) & 0xFFFF
        self.lost += gap
        elapsed = int((now - self._last_out) / FRAME_S + 1e-6) if self._last_out is not None else MAX_CONCEALED
        concealed = gap if gap <= MAX_CONCEALED else 0
        out: list[tuple[bytes | None, float]] = [(None, now)] * max(0, min(concealed, elapsed))
        self.expected = nearest
        return out + self._release()
