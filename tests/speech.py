"""Spoken test input made at test time.

Questions are spoken by Piper (a neural voice that Whisper tiny.en hears
reliably); espeak-ng's formant voice is available too, but tiny.en mishears
it often ("capital and friends"), which would test the model, not our code.
Piper's sampling noise is off, so the same text is the same audio in every
run: with it on, one rendering in a few of "What is the capital of France?"
was heard as "…capital of friends?" over 8 kHz μ-law, failing SIP tests at
random (measured 2026-11-29; the same rendering fails with every endpointing
setting, so it was the input, not the code under test).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sub300.media.audio_file import read_audio, write_wav

RATE = 16_000


_piper = None


def speak(text: str, *, engine: str = "piper", voice: str = "en-us", speed_wpm: int = 150) -> np.ndarray:
    """`text` spoken by Piper (default) or espeak-ng, as 16 kHz mono int16, trimmed."""
    if engine == "piper":
        global _piper
        from sub300.agent.audio import resample
        from sub300.models.tts_piper import PiperSynthesizer

        _piper = _piper or PiperSynthesizer(noise_scale=0.0, noise_w_scale=0.0)
        pcm = resample(np.concatenate(list(_piper.synthesize(text))), _piper.sample_rate, RATE)
        span = voiced_span(pcm)
        assert span is not None, "Piper produced silence"
        return pcm[int(span[0] * RATE): int(span[1] * RATE)]
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is required by the tests (scripts/setup.sh installs it as root)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-w", str(wav), text], check=True)
        pcm = read_audio(wav, RATE)
    span = voiced_span(pcm)  # espeak pads with silence; tests place their own
    assert span is not None, "espeak-ng produced silence"
    return pcm[int(span[0] * RATE): int(span[1] * RATE)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


def compose(*parts: np.ndarray | float) -> np.ndarray:
    """Concatenate speech arrays and silences given in seconds."""
    return np.concatenate([silence(p) if isinstance(p, (int, float)) else p for p in parts])


def save(path: Path, pcm: np.ndarray, rate: int = RATE) -> Path:
    write_wav(path, pcm, rate)
    return path


def voiced_span(pcm: np.ndarray, rate: int = RATE, floor_dbfs: float = -45.0, frame_ms: int = 10) -> tuple[float, float] | None:
    """(first, last) time in seconds where 10 ms frames are louder than `floor_dbfs`."""
    n = rate * frame_ms // 1000
    frames = pcm[: len(pcm) // n * n].astype(np.float64).reshape(-1, n)
    rms = np.sqrt(np.mean(frames ** 2, axis=1)) / 32768.0
    loud = np.nonzero(rms > 10 ** (floor_dbfs / 20))[0]
    if len(loud) == 0:
        return None
    return loud[0] * frame_ms / 1000, (loud[-1] + 1) * frame_ms / 1000
