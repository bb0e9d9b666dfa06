"""The caller's track in: decoded Opus (48 kHz, usually stereo) → 16 kHz mono AudioFrames.

Each frame is stamped with the monotonic time it came out of aiortc's jitter
buffer: the moment the conversation could first have heard it.  A caller
whose audio stops altogether (a browser tab frozen, a network gone without
an ICE failure yet) ends the read after `silence_timeout_s`.

With a `MeasuredJitterBuffer` (media/webrtc/jitter.py) each frame's way in
is kept in `InboundTimings`: packet arrival → released by the jitter buffer →
decoded and read here, so a turn's ledger can say how long the caller's last
words waited on our side before the VAD heard them.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.models.protocols import SAMPLE_RATE

from .jitter import MeasuredJitterBuffer

#: frames of timing kept (10 s of 20 ms frames)
_KEEP_FRAMES = 500


class CallerAudioStopped(Exception):
    """No caller audio for too long."""


def to_mono_int16(frame) -> np.ndarray:
    """An av.AudioFrame in packed s16 (what aiortc's decoders give) → int16 mono."""
    pcm = frame.to_ndarray().reshape(-1)
    channels = len(frame.layout.channels)
    if channels > 1:
        # average rather than let libswresample mix L+R at +3 dB, which clips loud speech
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm.astype(np.int16, copy=False)


class InboundTimings:
    """Per caller frame read: (read time, jitter-buffer wait ms, decode wait ms), the last 10 s."""

    def __init__(self) -> None:
        self.frames: deque[tuple[float, float, float]] = deque(maxlen=_KEEP_FRAMES)
        self.unmatched = 0    # frames whose arrival the buffer did not know (pts changed by the decoder)

    def add(self, read_at: float, arrival: float, released: float) -> None:
        self.frames.append((read_at, (released - arrival) * 1000.0, (read_at - released) * 1000.0))

    def around(self, at: float, before_s: float = 1.0, after_s: float = 0.1) -> tuple[float, float] | None:
        """Median (jitter-buffer wait, decode wait) in ms of the frames read in [at − before_s, at + after_s]
        (the caller's last words before a turn's ``speech_end``), or None when none was measured."""
        near = [(b, d) for t, b, d in self.frames if at - before_s <= t <= at + after_s]
        if not near:
            return None
        return statistics.median(b for b, _ in near), statistics.median(d for _, d in near)


async def read_caller_audio(
    track: MediaStreamTrack,
    on_frame: Callable[[AudioFrame], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    silence_timeout_s: float = 20.0,
    buffer: MeasuredJitterBuffer | None = None,
    timings: InboundTimings | None = None,
) -> None:
    """Feed `on_frame` until the track ends (returns) or goes quiet (raises CallerAudioStopped).

    With ``buffer`` (the receiver's measured jitter buffer, same ``clock``) and ``timings``, each
    frame's arrival, release and read times go to ``timings``."""
    resampler: StreamResampler | None = None
    while True:
        try:
            async with asyncio.timeout(silence_timeout_s):
                frame = await track.recv()
        except MediaStreamError:
            return
        except TimeoutError:
            raise CallerAudioStopped(f"no audio from the caller for {silence_timeout_s:.0f} s") from None
        if not isinstance(frame, av.AudioFrame) or frame.format.name != "s16":
            raise ValueError(f"unexpected decoded audio {frame}")
        if resampler is None or resampler.from_rate != frame.sample_rate:
            resampler = StreamResampler(frame.sample_rate, SAMPLE_RATE)
        samples = resampler.process(to_mono_int16(frame))
        now = clock()
        if buffer is not None and timings is not None:
            stamps = buffer.taken(frame.pts)
            if stamps is None:
                timings.unmatched += 1
            else:
                timings.add(now, *stamps)
        if len(samples):
            on_frame(AudioFrame(samples, now))
