"""Audio types and conversions shared by the conversation and the transports.

Everything inside the pipeline is int16 mono; the conversation consumes
16 kHz frames stamped with their arrival time.  Resampling uses PyAV
(libswresample), streaming and stateful so chunk borders leave no clicks.
"""
from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np


@dataclass(frozen=True)
class AudioFrame:
    """A piece of caller audio: int16 mono at 16 kHz."""

    samples: np.ndarray
    #: monotonic time at which the frame's last sample arrived
    timestamp: float


class StreamResampler:
    """int16 mono from one rate to another, chunk by chunk."""

    def __init__(self, from_rate: int, to_rate: int):
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._resampler = (
            None
            if from_rate == to_rate
            else av.AudioResampler(format="s16", layout="mono", rate=to_rate)
        )
        self._pts = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._resampler is None:
            return pcm.astype(np.int16, copy=False)
        if len(pcm) == 0:
            return np.zeros(0, np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.from_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter (call once at the end of a stream)."""
        if self._resampler is None:
            return np.zeros(0, np.int16)
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.int16, copy=False) if parts else np.zeros(0, np.int16)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a whole clip (int16 mono)."""
    r = StreamResampler(from_rate, to_rate)
    out = r.process(pcm)
    tail = r.flush()
    return np.concatenate([out, tail]) if len(tail) else out


def int16_to_float32(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def rms(pcm: np.ndarray) -> float:
    """Root mean square of int16 audio, in int16 units (0.0 for no samples); computed in float64."""
    if len(pcm) == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(pcm.astype(np.float64)))))


def rms_dbfs(pcm: np.ndarray, floor: float = float("-inf")) -> float:
    """Loudness of int16 audio in dBFS (full scale = 32768); ``floor`` for digital silence or no samples."""
    level = rms(pcm) / 32768.0
    return 20.0 * np.log10(level) if level > 0 else floor
