"""Read any common audio file as 16 kHz mono int16 (PyAV); write WAV files."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import av
import numpy as np

from sub300.models.protocols import SAMPLE_RATE


class AudioFileError(ValueError):
    """The file is missing, unreadable, not audio, or holds no samples."""


def read_audio(path: str | os.PathLike, rate: int = SAMPLE_RATE) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioFileError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{path}: empty file")
    parts: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioFileError(f"{path}: contains no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except AudioFileError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise AudioFileError(f"{path}: cannot decode as audio ({error})") from None
    if not parts or sum(len(p) for p in parts) == 0:
        raise AudioFileError(f"{path}: holds no audio samples")
    return np.concatenate(parts).astype(np.int16, copy=False)


def write_wav(path: str | os.PathLike, pcm: np.ndarray, rate: int) -> None:
    """int16 mono → 16-bit PCM WAV."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.asarray(pcm, dtype="<i2").tobytes())


__all__ = ["AudioFileError", "read_audio", "write_wav"]
