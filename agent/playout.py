"""Agent audio waiting to be played, at the transport's rate, flushable at once.

The conversation pushes synthesized audio; the transport's paced clock pulls
fixed-size frames (20 ms for WebRTC and RTP, any size for a file) and hands
them to the caller.  The queue knows which turn each sample belongs to, so it
can say when a turn's first sample went out (the ledger's `first_audio_out`)
and how much of a turn was actually played (for barge-in truncation).
Single-threaded: used only from the event loop.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Clock = Callable[[], float]


@dataclass
class _Segment:
    pcm: np.ndarray
    turn: int
    on_first_out: Callable[[float], None] | None
    offset: int = 0


@dataclass
class PlayoutQueue:
    sample_rate: int
    clock: Clock
    _segments: deque[_Segment] = field(default_factory=deque)
    _played: dict[int, int] = field(default_factory=dict)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def push(self, pcm: np.ndarray, *, turn: int, on_first_out: Callable[[float], None] | None = None) -> None:
        if len(pcm) == 0:
            return
        self._segments.append(_Segment(np.asarray(pcm, dtype=np.int16), turn, on_first_out))
        self._idle.clear()

    def pull(self, n: int) -> np.ndarray | None:
        """The next `n` samples (zero-padded at the end of the queue), or None when idle."""
        if not self._segments:
            self._idle.set()
            return None
        out = np.zeros(n, np.int16)
        filled = 0
        now = self.clock()
        while filled < n and self._segments:
            seg = self._segments[0]
            if seg.offset == 0 and seg.on_first_out is not None:
                seg.on_first_out(now)
                seg.on_first_out = None
            take = min(n - filled, len(seg.pcm) - seg.offset)
            out[filled:filled + take] = seg.pcm[seg.offset:seg.offset + take]
            seg.offset += take
            filled += take
            self._played[seg.turn] = self._played.get(seg.turn, 0) + take
            if seg.offset >= len(seg.pcm):
                self._segments.popleft()
        if not self._segments:
            self._idle.set()
        return out

    def flush(self) -> int:
        """Drop everything not yet played; returns the number of samples dropped."""
        dropped = sum(len(s.pcm) - s.offset for s in self._segments)
        self._segments.clear()
        self._idle.set()
        return dropped

    @property
    def queued_samples(self) -> int:
        return sum(len(s.pcm) - s.offset for s in self._segments)

    def played_samples(self, turn: int) -> int:
        return self._played.get(turn, 0)

    @property
    def idle(self) -> bool:
        return not self._segments

    async def wait_idle(self) -> None:
        """Return once everything queued has been pulled (or flushed)."""
        while self._segments:
            self._idle.clear()
            await self._idle.wait()
