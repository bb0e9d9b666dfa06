"""The agent's track out: 20 ms frames at the playout rate, paced on the wall clock.

aiortc's sender calls `recv()` in a loop and sends whatever it returns, so
the pacing lives here: each frame is pulled from the PlayoutQueue at its
deadline, the moment it goes on the wire — which makes the queue's
first-sample callback the ledger's true `first_audio_out`.  Silence is sent
while the queue is idle; flushing the queue (barge-in) silences the very
next frame.

The track also notes when each sound starts (`onsets`: a frame louder than
-55 dBFS after 250 ms of quieter ones, the rule of the page's meter and of
the aiortc test caller): a reply's first samples are often near silence
(TTS voices start softly), so the caller hears it somewhat after
``first_audio_out``; the ledger's outbound part ``quiet_lead`` is that gap.
"""
from __future__ import annotations

import fractions
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sub300.agent.audio import rms_dbfs
from sub300.agent.playout import PlayoutQueue
from sub300.media.pacing import Pacer

FRAME_MS = 20
#: after a stall longer than this (a blocked event loop), restart the clock instead of bursting to catch up
_MAX_LAG_S = 0.5
#: a sound starts: a frame above this after `ONSET_GAP_S` of quieter ones (web/static/meter-worklet.js's rule)
ONSET_DBFS = -55.0
ONSET_GAP_S = 0.25


class PlayoutTrack(MediaStreamTrack):
    """An aiortc audio track of 20 ms mono s16 frames at ``playout.sample_rate``, pulled from the queue at each deadline.

    `recv()` raises `MediaStreamError` once the track is stopped.  The clock
    starts at the first `recv()`; after a stall of more than 0.5 s it restarts
    rather than bursting the missed frames (see `media.pacing`).
    """

    kind = "audio"

    def __init__(self, playout: PlayoutQueue, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.playout = playout
        self.clock = clock
        self.rate = playout.sample_rate
        self.samples = self.rate * FRAME_MS // 1000
        self._time_base = fractions.Fraction(1, self.rate)
        self._pacer = Pacer(FRAME_MS / 1000, clock, max_lag_s=_MAX_LAG_S)
        self._pts = 0
        self._silence = np.zeros(self.samples, np.int16)
        #: clock times at which a sound started (the frame's pull), the latest 64
        self.onsets: deque[float] = deque(maxlen=64)
        self._last_loud = float("-inf")

    def first_sound_after(self, at: float, within_s: float = 2.0) -> float | None:
        """The first sound onset at or after ``at`` (clock s), within ``within_s``; None if none."""
        return next((t for t in self.onsets if at - 0.001 <= t <= at + within_s), None)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.next_tick()
        if self.readyState != "live":  # stopped while we slept
            raise MediaStreamError
        pcm = self.playout.pull(self.samples)
        if pcm is not None and rms_dbfs(pcm) > ONSET_DBFS:
            now = self.clock()
            if now - self._last_loud >= ONSET_GAP_S:
                self.onsets.append(now)
            self._last_loud = now
        frame = av.AudioFrame.from_ndarray(
            (self._silence if pcm is None else pcm).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += self.samples
        return frame
