"""Smart Turn v3.2: the probability that a caller's turn is complete, from the sound of its end.

The model is pipecat's Smart Turn v3.2 (Daily, BSD-2-Clause): a Whisper-tiny
encoder with a classification head, trained on the prosody of complete and
incomplete turns, exported to ONNX with a sigmoid output.  Its CPU build ships
inside the ``pipecat-ai`` wheel (``bundled:smart-turn-v3.2``, models/bundled.py);
it is loaded with ONNX Runtime, pipecat itself is never imported.

Input, as pipecat prepares it (pipecat/audio/turn/smart_turn/
local_smart_turn_v3.py, ``_predict_endpoint``, and _whisper_features.py in
pipecat-ai 1.14.0), written here anew:

* the turn's audio, float32 16 kHz, up to the moment it is scored;
* its last ``WINDOW_S`` = 8 s, or zero-padded *at the start* to 8 s
  (128 000 samples);
* the waveform normalised to zero mean and unit variance (``+ 1e-7`` under the
  square root: transformers' ``WhisperFeatureExtractor(do_normalize=True)``);
* Whisper log-mel features, 80 mels x 800 frames (n_fft 400, hop 160,
  reflect-centred STFT, last frame dropped, log10 clamped to max - 8, then
  ``(x + 4) / 4``): faster-whisper's own `FeatureExtractor` with no extra
  padding gives pipecat's features to within 4e-7 (tests/test_smart_turn.py
  checks this against pipecat's file);
* the ONNX input ``input_features`` of shape (1, 80, 800); output[0][0] is
  P(complete) in 0..1.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundled import is_bundled, resolve_bundled
from .onnx import onnx_session, session_device
from .protocols import SAMPLE_RATE, ModelError, ModelUnavailable

#: seconds of audio the model hears: the last 8 s of the turn (pipecat: ``n_seconds=8``)
WINDOW_S = 8
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE
#: the variance floor of the waveform normalisation (transformers' WhisperFeatureExtractor)
NORMALIZE_EPS = 1e-7
N_MELS = 80
N_FRAMES = WINDOW_SAMPLES // 160     # 800 frames of 10 ms


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last `WINDOW_S` seconds of ``audio`` (float32 16 kHz), zero-padded at the start when shorter."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if len(audio) >= WINDOW_SAMPLES:
        return audio[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - len(audio), np.float32), audio])


class SmartTurnFeatures:
    """Whisper log-mel features of the model's 8 s window: float32 (80, 800) (see the module docstring)."""

    def __init__(self) -> None:
        from faster_whisper.feature_extractor import FeatureExtractor

        self._extract = FeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_S)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        window = last_window(audio)
        window = (window - window.mean()) / np.sqrt(window.var() + NORMALIZE_EPS)
        features = self._extract(window, padding=0)
        return np.asarray(features, dtype=np.float32)


class SmartTurnModel:
    """`TurnCompletionModel` on Smart Turn v3.2 ONNX (a path, or ``bundled:smart-turn-v3.2``).

    ``device``: "auto" | "cpu" | "cuda" (models/onnx.py).  ``threads``: ONNX
    Runtime's intra-op threads on the CPU; keep it small, the model shares the
    cores with Whisper, the LLM and Piper.  Raises `ModelUnavailable` when the
    file or its package is missing (the message names the install command).
    """

    name = "smart-turn-v3.2"

    def __init__(self, model: str | Path = "bundled:smart-turn-v3.2", *, device: str = "auto", threads: int = 1):
        ref = str(model)
        path = resolve_bundled(ref) if is_bundled(ref) else Path(os.path.expanduser(ref))
        if not path.is_file():
            raise ModelUnavailable(f"turn model {ref!r}: no such ONNX file {path}")
        self.path = path
        self._session = onnx_session(path, "turn model Smart Turn v3.2", device=device, threads=threads)
        self.device = session_device(self._session)
        self._features = SmartTurnFeatures()
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != ["input_features"]:
            raise ModelUnavailable(f"{path}: not a Smart Turn v3 model (inputs {inputs}, expected ['input_features'])")

    def probability(self, audio: np.ndarray) -> float:
        """Blocking.  ``audio``: the turn so far, float32 mono 16 kHz in [-1, 1] (only its last 8 s
        are heard).  Returns P(the turn is complete), 0..1.  Raises `ModelError` on an inference error."""
        features = self._features(audio)[np.newaxis]
        try:
            outputs = self._session.run(None, {"input_features": features})
        except Exception as exc:
            raise ModelError(f"Smart Turn v3.2 inference failed: {exc}") from exc
        return float(np.asarray(outputs[0]).reshape(-1)[0])
