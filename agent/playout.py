"""Agent audio waiting to be played, at the transport's rate, flushable at once.

The conversation pushes synthesized audio; the transport's paced clock pulls
fixed-size frames (20 ms for WebRTC and RTP, any size for a file) and hands
them to the caller.  The queue knows which turn each sample belongs to, so it
can say when a turn's first sample went out (the ledger's `first_audio_out`)
and how much of each piece of a reply was actually played (for barge-in
truncation).  It can pause at once (the caller may be interrupting) and
resume from the start of the interrupted segment (it was only a cough).
It counts the agent audio handed to the transport (`played_total`: samples
of the replies pulled, not the zero padding of a last frame nor anything
flushed or never pulled; a segment played again after a false interruption
counts twice, it was heard twice), which the call's usage meter reports
(agent/metering.py).  Single-threaded: used only from the event loop.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Clock = Callable[[], float]


@dataclass
class _Segment:
    pcm: np.ndarray
    turn: int
    piece: int
    on_first_out: Callable[[float], None] | None
    offset: int = 0


@dataclass
class PlayoutQueue:
    sample_rate: int
    clock: Clock
    _segments: deque[_Segment] = field(default_factory=deque)
    #: (turn, piece) -> [samples played, samples queued in all]
    _pieces: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    paused: bool = False
    #: the call is on hold (`hold`): nothing plays, whatever a barge-in decides meanwhile
    held: bool = False
    #: when the transport first found the queue paused (the agent fell silent)
    silenced_at: float | None = None
    #: called with (pcm, time) for every pulled frame: agent audio, or the silence a None stands for
    #: (the echo guard listens)
    on_played: Callable[[np.ndarray, float], None] | None = None
    #: samples of agent audio pulled by the transport since the queue was made (usage: agent audio)
    played_total: int = 0

    def __post_init__(self) -> None:
        self._idle.set()

    def push(self, pcm: np.ndarray, *, turn: int, piece: int = 0,
             on_first_out: Callable[[float], None] | None = None) -> None:
        if len(pcm) == 0:
            return
        self._segments.append(_Segment(np.asarray(pcm, dtype=np.int16), turn, piece, on_first_out))
        self._pieces.setdefault((turn, piece), [0, 0])[1] += len(pcm)
        self._idle.clear()

    def pull(self, n: int) -> np.ndarray | None:
        """The next `n` samples (zero-padded at the end of the queue), or None when idle, paused or held.

        Every transport sends `n` samples of silence for a None, so ``on_played`` hears them as
        played silence: the echo guard's history must hold the gaps between the pieces of a
        reply exactly as they come back on the line (without them, the echo of a piece that
        followed a gap did not match the history and passed for the caller's voice).
        """
        if not self._segments:
            self._idle.set()
            self._played_silence(n)
            return None
        if self.held:
            self._played_silence(n)
            return None
        if self.paused:
            if self.silenced_at is None:
                self.silenced_at = self.clock()  # the first frame that goes out silent
            self._played_silence(n)
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
            self._pieces[(seg.turn, seg.piece)][0] += take
            self.played_total += take
            if seg.offset >= len(seg.pcm):
                self._segments.popleft()
        if not self._segments:
            self._idle.set()
        if self.on_played is not None:
            self.on_played(out, now)
        return out

    def _played_silence(self, n: int) -> None:
        if self.on_played is not None:
            self.on_played(np.zeros(n, np.int16), self.clock())

    def pause(self) -> None:
        """Stop playing at once, keeping what is queued."""
        if not self.paused:
            self.paused = True
            self.silenced_at = None

    def resume(self, rewind: bool = True) -> None:
        """Play again; with `rewind`, from the start of the segment that was cut."""
        if rewind and self._segments:
            seg = self._segments[0]
            self._pieces[(seg.turn, seg.piece)][0] -= seg.offset
            seg.offset = 0
        self.paused = False

    def hold(self) -> None:
        """The far end stopped listening (call on hold): keep everything queued, play nothing until `unhold`.

        Separate from `pause`, so a barge-in decided during the hold cannot start the audio again.
        """
        self.held = True

    def unhold(self) -> None:
        """Play again from the exact sample where the hold stopped (nothing was pulled meanwhile)."""
        self.held = False

    def flush(self) -> int:
        """Drop everything not yet played; returns the number of samples dropped."""
        dropped = sum(len(s.pcm) - s.offset for s in self._segments)
        self._segments.clear()
        self.paused = False
        self._idle.set()
        return dropped

    @property
    def queued_samples(self) -> int:
        return sum(len(s.pcm) - s.offset for s in self._segments)

    def played_samples(self, turn: int) -> int:
        return sum(played for (t, _), (played, _total) in self._pieces.items() if t == turn)

    def played_fraction(self, turn: int, piece: int) -> float:
        """Share of a reply piece that went out (0 when it was never queued)."""
        played, total = self._pieces.get((turn, piece), (0, 0))
        return played / total if total else 0.0

    def forget_turn(self, turn: int) -> None:
        """Drop the bookkeeping of a finished turn."""
        for key in [k for k in self._pieces if k[0] == turn]:
            del self._pieces[key]

    @property
    def idle(self) -> bool:
        return not self._segments

    @property
    def audible(self) -> bool:
        """Agent audio is going out right now."""
        return bool(self._segments) and not self.paused and not self.held

    async def wait_idle(self) -> None:
        """Return once everything queued has been pulled (or flushed)."""
        while self._segments:
            self._idle.clear()
            await self._idle.wait()
