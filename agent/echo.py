"""Recognise the agent's own voice coming back on the caller's line.

Phones have no echo canceller in the path we control: what the agent says
comes back on the inbound RTP stream, delayed and codec-distorted, and would
otherwise make the agent interrupt (or answer) itself.  The guard keeps the
last second of audio the agent actually played (resampled to 16 kHz) and
flags an inbound frame as echo when its normalised cross-correlation with
that history, at any delay, exceeds a threshold.  Caller speech on top of
the echo correlates much less, so a real barge-in still gets through.
"""
from __future__ import annotations

import numpy as np

from sub300.models.protocols import SAMPLE_RATE

from .audio import StreamResampler, rms

HISTORY_S = 1.0
#: inbound audio compared at once: 20 ms frames are too short (any voiced
#: sound correlates well with *some* 20 ms of speech); 160 ms is not
WINDOW_S = 0.16
#: while the agent speaks, inbound frames quieter than this (about -50 dBFS) are
#: not a voice to interrupt with; webrtcvad would call some of them voiced
MIN_RMS = 100.0
#: silent samples fed after the last sound before the resampler's filter holds none of it (16 kHz; its
#: delay is a few dozen samples, so this is a wide margin)
_RESAMPLER_TAIL = 1024


class EchoGuard:
    def __init__(self, played_rate: int, threshold: float = 0.6):
        self.threshold = threshold
        self._resampler = StreamResampler(played_rate, SAMPLE_RATE)
        self._history = np.zeros(int(HISTORY_S * SAMPLE_RATE), np.float32)
        self._last_played = float("-inf")
        self._inbound = np.zeros(int(WINDOW_S * SAMPLE_RATE), np.float32)
        #: silent samples at the end of the history (it starts silent)
        self._quiet = len(self._history) + _RESAMPLER_TAIL

    def note_played(self, pcm: np.ndarray, at: float) -> None:
        """Called by the playout queue for every frame that went out: agent audio, or the silence
        between replies and pieces (agent/playout.py)."""
        if self._quiet >= len(self._history) + _RESAMPLER_TAIL and not pcm.any():
            return   # the history is silence already and the resampler holds no sound: nothing to add
        audio = self._resampler.process(pcm).astype(np.float32)
        if len(audio) == 0:
            return
        _shift_in(self._history, audio)
        loud = np.flatnonzero(audio)
        if len(loud):
            self._last_played = at
            self._quiet = len(audio) - 1 - int(loud[-1])
        else:
            self._quiet += len(audio)

    def active(self, now: float) -> bool:
        return now - self._last_played < HISTORY_S

    def _correlation(self) -> float:
        """Highest normalised correlation of the latest inbound audio with the played history (0..1)."""
        x = self._inbound - self._inbound.mean()
        energy = float(np.dot(x, x))
        h = self._history
        n = len(h) + len(x) - 1
        size = 1 << (n - 1).bit_length()
        corr = np.fft.irfft(np.fft.rfft(h, size) * np.conj(np.fft.rfft(x, size)), size)[: len(h) - len(x) + 1]
        # energy of each history window of len(x)
        c = np.concatenate([[0.0], np.cumsum(h.astype(np.float64) ** 2)])
        windows = c[len(x):] - c[: len(h) - len(x) + 1]
        valid = windows > energy * 1e-4
        if energy == 0.0 or not np.any(valid):
            return 0.0
        denom = np.sqrt(windows[valid] * energy)
        return float(np.max(np.abs(corr[valid]) / denom))

    def is_echo(self, frame: np.ndarray, now: float) -> bool:
        """Inbound audio that must not count as the caller's voice while the agent speaks:
        its echo, or audio too quiet to interrupt with (the decaying tail of the echo)."""
        if not self.active(now):
            return False
        _shift_in(self._inbound, frame)  # keep the window current, even for quiet frames
        if len(frame) == 0 or rms(frame) < MIN_RMS:
            return True
        return self._correlation() >= self.threshold


def _shift_in(buffer: np.ndarray, new: np.ndarray) -> None:
    """Append `new` to the end of a fixed-size buffer in place, dropping the oldest samples."""
    n = min(len(new), len(buffer))
    if n == 0:
        return
    buffer[:-n] = buffer[n:]
    buffer[-n:] = new[-n:]
