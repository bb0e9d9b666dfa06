"""espeak-ng through its command-line binary: fast, robotic, no weights.

Each ``synthesize`` call runs ``espeak-ng --stdout`` and streams the WAV it
writes: the header is parsed once, then PCM is yielded as it arrives.  If the
consumer closes the generator early (barge-in) the process is killed and
reaped, so no zombie is left.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from typing import IO

import numpy as np

from . import defaults
from .protocols import ModelError, ModelUnavailable

_READ_BYTES = 4096  # ≈ 93 ms at 22.05 kHz int16
_MAX_TEXT_CHARS = 100_000  # text goes on the command line (argv limit 128 KiB)


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = stream.read(n - len(buf))
        if not part:
            break
        buf += part
    return buf


def _read_wav_header(stream: IO[bytes]) -> tuple[int, int, int]:
    """Parse a (streaming) RIFF/WAVE header up to the data chunk.

    Returns (sample_rate, channels, bits_per_sample).  espeak-ng writes a
    placeholder size (0x7ffff000) since it does not know the length upfront.
    """
    riff = _read_exact(stream, 12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise ModelError(f"espeak-ng did not write a WAV header (got {riff[:12]!r})")
    fmt: tuple[int, int, int] | None = None
    while True:
        head = _read_exact(stream, 8)
        if len(head) < 8:
            raise ModelError("espeak-ng WAV output ended before its data chunk")
        chunk_id, size = head[:4], struct.unpack("<I", head[4:])[0]
        if chunk_id == b"data":
            break
        body = _read_exact(stream, size + (size & 1))
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ModelError("espeak-ng WAV fmt chunk is truncated")
            audio_format, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if audio_format != 1:
                raise ModelError(f"espeak-ng WAV is not PCM (format {audio_format})")
            fmt = (rate, channels, bits)
    if fmt is None:
        raise ModelError("espeak-ng WAV has no fmt chunk")
    return fmt


class EspeakSynthesizer:
    """SpeechSynthesizer over the espeak-ng binary."""

    name = "espeak"

    def __init__(self, voice: str = defaults.ESPEAK_VOICE, *, speed_wpm: int = defaults.ESPEAK_SPEED_WPM,
                 binary: str = "espeak-ng") -> None:
        path = shutil.which(binary)
        if path is None:
            raise ModelUnavailable(f"espeak-ng binary {binary!r} not found (apt-get install espeak-ng)")
        if not defaults.ESPEAK_SPEED_WPM_MIN <= int(speed_wpm) <= defaults.ESPEAK_SPEED_WPM_MAX:
            raise ValueError(f"speed_wpm must be in {defaults.ESPEAK_SPEED_WPM_MIN}..{defaults.ESPEAK_SPEED_WPM_MAX}, got {speed_wpm!r}")
        self.binary = path
        self.voice = voice
        self.speed_wpm = int(speed_wpm)
        # Probe once: checks the voice exists and learns the output format.
        try:
            proc = subprocess.run(
                self._command("a"), capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelUnavailable(f"cannot run {path}: {exc}") from exc
        if proc.returncode != 0 or not proc.stdout:
            msg = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise ModelUnavailable(f"espeak-ng voice {voice!r} unusable: {msg}")
        import io

        rate, channels, bits = _read_wav_header(io.BytesIO(proc.stdout))
        if channels != 1 or bits != 16:
            raise ModelUnavailable(f"espeak-ng writes {channels} ch/{bits} bit audio; expected mono 16-bit")
        self.sample_rate: int = rate

    def _command(self, text: str) -> list[str]:
        return [self.binary, "--stdout", "-b", "1", "-v", self.voice, "-s", str(self.speed_wpm), "--", text]

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield int16 mono chunks at ``sample_rate`` as espeak-ng writes them."""
        if not text or not text.strip():
            return
        if len(text) > _MAX_TEXT_CHARS:
            raise ModelError(f"text too long for espeak-ng ({len(text)} chars > {_MAX_TEXT_CHARS})")
        try:
            proc = subprocess.Popen(
                self._command(text), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ModelError(f"cannot start espeak-ng: {exc}") from exc
        try:
            assert proc.stdout is not None
            _read_wav_header(proc.stdout)
            carry = b""
            while True:
                data = proc.stdout.read1(_READ_BYTES)  # type: ignore[attr-defined]  # a BufferedReader
                if not data:
                    break
                data = carry + data
                usable = len(data) & ~1
                carry = data[usable:]
                if usable:
                    yield np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
            rc = proc.wait()
            if rc != 0:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise ModelError(f"espeak-ng failed (exit status {rc}): {err}")
        finally:
            # Early close (GeneratorExit), an error, or normal end: never leave
            # the child running or unreaped.
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def __repr__(self) -> str:
        return f"EspeakSynthesizer(voice={self.voice!r}, speed_wpm={self.speed_wpm})"
