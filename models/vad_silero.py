"""Silero VAD through ONNX Runtime; the ONNX ships inside faster-whisper.

One ``InferenceSession`` per model file and device per process, shared by all streams
(ONNX Runtime's ``run`` is thread-safe); each stream keeps its own recurrent
state and the last 64 samples of the previous frame, which the model expects
in front of every 512-sample (32 ms) frame at 16 kHz.

Two input layouts are handled, found by the model's input names:

* v6 (faster-whisper's ``silero_vad_v6.onnx``): ``input`` [N, 576], ``h`` and
  ``c`` [1, 1, 128] → ``speech_probs``, ``hn``, ``cn``.
* v5 (the upstream silero-vad release): ``input`` [N, 576], ``state``
  [2, 1, 128], ``sr`` (int64) → ``output``, ``stateN``.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from . import defaults
from .onnx import onnx_session, session_device
from .protocols import SAMPLE_RATE, ModelError, ModelUnavailable

FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the only chunk size the model takes there
CONTEXT_SAMPLES = 64  # samples of the previous chunk prepended to each chunk

_SESSIONS: dict[tuple[Path, str], object] = {}
_SESSIONS_LOCK = threading.Lock()


def _shared_session(path: Path, device: str = "auto"):
    """One onnxruntime session per model file and device (auto | cpu | cuda: models/onnx.py) per process."""
    key = (path.resolve(), device)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = onnx_session(key[0], "Silero VAD model", device=device, threads=1, memory_arena=False,
                                   log_level=4)
            _SESSIONS[key] = session
        return session


class SileroVadStream:
    """One call's recurrent state and context samples."""

    def __init__(self, vad: SileroVad) -> None:
        self._vad = vad
        self._context = np.zeros((1, CONTEXT_SAMPLES), dtype=np.float32)
        if vad._layout == "v6":
            self._h = np.zeros((1, 1, 128), dtype=np.float32)
            self._c = np.zeros((1, 1, 128), dtype=np.float32)
        else:
            self._state = np.zeros((2, 1, 128), dtype=np.float32)

    def speech_probability(self, frame: np.ndarray) -> float:
        frame = np.asarray(frame)
        if frame.ndim != 1 or frame.shape[0] != FRAME_SAMPLES:
            raise ValueError(
                f"Silero VAD expects {FRAME_SAMPLES} samples per frame, got shape {frame.shape}"
            )
        if frame.dtype == np.int16:
            audio = frame.astype(np.float32) / 32768.0
        elif frame.dtype == np.float32:
            audio = frame
        else:
            raise ValueError(f"Silero VAD expects int16 (or float32) samples, got {frame.dtype}")
        x = np.concatenate([self._context, audio[np.newaxis, :]], axis=1)
        session = self._vad._session
        try:
            if self._vad._layout == "v6":
                prob, self._h, self._c = session.run(None, {"input": x, "h": self._h, "c": self._c})
            else:
                prob, self._state = session.run(
                    None, {"input": x, "state": self._state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
                )
        except Exception as exc:
            raise ModelError(f"Silero VAD inference failed: {exc}") from exc
        self._context = x[:, -CONTEXT_SAMPLES:]
        return float(np.asarray(prob).reshape(-1)[0])


class SileroVad:
    """VoiceActivityDetector over Silero VAD (ONNX, 32 ms frames at 16 kHz)."""

    name = "silero"
    frame_samples = FRAME_SAMPLES

    def __init__(self, model_path: Path | str | None = None, threshold: float = defaults.SILERO_THRESHOLD,
                 device: str = "auto") -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Silero VAD threshold must be in (0, 1), got {threshold!r}")
        if model_path is None:
            from .bundled import silero_vad_onnx

            model_path = silero_vad_onnx()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelUnavailable(f"Silero VAD model not found at {model_path}")
        self.model_path = model_path
        self.threshold = threshold
        self._session = _shared_session(model_path, device)
        self.device = session_device(self._session)
        inputs = {i.name for i in self._session.get_inputs()}
        if {"input", "h", "c"} <= inputs:
            self._layout = "v6"
        elif {"input", "state", "sr"} <= inputs:
            self._layout = "v5"
        else:
            raise ModelUnavailable(
                f"{model_path} does not look like a Silero VAD v5/v6 model (inputs: {sorted(inputs)})"
            )

    def new_stream(self) -> SileroVadStream:
        return SileroVadStream(self)

    def __repr__(self) -> str:
        return f"SileroVad({str(self.model_path)!r}, threshold={self.threshold}, device={self.device!r})"
