"""What the in-process TTS engines (Piper, Coqui) share: float audio to int16, and their failures as `ModelError`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from .protocols import ModelError

_MAX_INT16 = 32767.0


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] (any shape) as int16, clipped."""
    return np.clip(audio * _MAX_INT16, -_MAX_INT16, _MAX_INT16).astype(np.int16)


@contextmanager
def synthesis_errors(engine: str, text: str) -> Iterator[None]:
    """Inside: any failure but a `ModelError` becomes one naming ``engine`` and the text's start.

    A generator's close (GeneratorExit) and cancellation are not `Exception`s: they pass unchanged."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{engine} synthesis failed for {text[:60]!r}: {exc}") from exc
