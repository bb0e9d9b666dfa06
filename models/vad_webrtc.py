"""webrtcvad (package ``webrtcvad-wheels``): the GMM voice detector from WebRTC.

No weights, microseconds per frame.  Each stream owns its own ``webrtcvad.Vad``
(the detector adapts its noise model over time, so streams must not share
one).  The answer is binary: ``speech_probability`` returns 1.0 or 0.0.
"""
from __future__ import annotations

import numpy as np

from . import defaults
from .protocols import SAMPLE_RATE, ModelUnavailable

_VALID_FRAME_MS = defaults.WEBRTC_FRAME_MS_CHOICES


def _import_webrtcvad():
    try:
        import webrtcvad
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ModelUnavailable(
            "webrtcvad is not installed (pip install webrtcvad-wheels)"
        ) from exc
    return webrtcvad


class WebRtcVadStream:
    """One call's detector state."""

    def __init__(self, vad, frame_samples: int) -> None:
        self._vad = vad
        self._frame_samples = frame_samples

    def speech_probability(self, frame: np.ndarray) -> float:
        frame = np.asarray(frame)
        if frame.ndim != 1 or frame.shape[0] != self._frame_samples:
            raise ValueError(
                f"webrtc VAD expects {self._frame_samples} samples per frame, "
                f"got shape {frame.shape}"
            )
        if frame.dtype != np.int16:
            raise ValueError(f"webrtc VAD expects int16 samples, got {frame.dtype}")
        voiced = self._vad.is_speech(np.ascontiguousarray(frame).tobytes(), SAMPLE_RATE)
        return 1.0 if voiced else 0.0


class WebRtcVad:
    """VoiceActivityDetector over webrtcvad (16 kHz, 10/20/30 ms frames)."""

    name = "webrtc"

    def __init__(self, aggressiveness: int = defaults.WEBRTC_AGGRESSIVENESS,
                 frame_ms: int = defaults.WEBRTC_FRAME_MS) -> None:
        if frame_ms not in _VALID_FRAME_MS:
            raise ValueError(f"webrtc VAD frame_ms must be one of {_VALID_FRAME_MS}, got {frame_ms!r}")
        if aggressiveness not in range(defaults.WEBRTC_AGGRESSIVENESS_MAX + 1):
            raise ValueError(f"webrtc VAD aggressiveness must be 0..3, got {aggressiveness!r}")
        self._webrtcvad = _import_webrtcvad()
        self.aggressiveness = aggressiveness
        self.frame_ms = frame_ms
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self.threshold = 0.5

    def new_stream(self) -> WebRtcVadStream:
        return WebRtcVadStream(self._webrtcvad.Vad(self.aggressiveness), self.frame_samples)

    def __repr__(self) -> str:
        return f"WebRtcVad(aggressiveness={self.aggressiveness}, frame_ms={self.frame_ms})"
