"""The last few seconds of caller audio, addressable by absolute sample index."""
from __future__ import annotations

import numpy as np


class AudioRing:
    def __init__(self, capacity_samples: int):
        self._buffer = np.zeros(capacity_samples, np.int16)
        self._capacity = capacity_samples
        self.end = 0  # absolute index after the newest sample

    def append(self, samples: np.ndarray) -> None:
        total = len(samples)
        samples = samples[-self._capacity:]
        n = len(samples)
        pos = self.end % self._capacity
        first = min(n, self._capacity - pos)
        self._buffer[pos: pos + first] = samples[:first]
        self._buffer[: n - first] = samples[first:]
        self.end += total

    @property
    def start(self) -> int:
        return max(0, self.end - self._capacity)

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) clipped to what is still held."""
        start, end = max(start, self.start), min(end, self.end)
        if end <= start:
            return np.zeros(0, np.int16)
        indices = np.arange(start, end) % self._capacity
        return self._buffer[indices]
