"""The caller's track in: decoded Opus (48 kHz, usually stereo) → 16 kHz mono AudioFrames.

Each frame is stamped with the monotonic time it came out of aiortc's jitter
buffer: the moment the conversation could first have heard it.  A caller
whose audio stops altogether (a browser tab frozen, a network gone without
an ICE failure yet) ends the read after `silence_timeout_s`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.models.protocols import SAMPLE_RATE


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


async def read_caller_audio(
    track: MediaStreamTrack,
    on_frame: Callable[[AudioFrame], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    silence_timeout_s: float = 20.0,
) -> None:
    """Feed `on_frame` until the track ends (returns) or goes quiet (raises CallerAudioStopped)."""
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
        if len(samples):
            on_frame(AudioFrame(samples, clock()))
