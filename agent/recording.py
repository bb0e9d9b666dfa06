"""A call's audio on disk, when a key (``sub300 keys create --record-audio``) or ``records.record_audio`` asks.

One WAV file per call, ``<records.recordings_dir>/<call id>.wav``: 16-bit, 16 kHz, two channels —
left the caller as the conversation heard it (every 20 ms frame fed to it, speech or not), right
the agent as the transport took it from the playout queue (the silence between replies included,
resampled with PyAV from the call's playout rate).  Both channels run on the transport's 20 ms
frames, so they line up to within a frame's jitter; the shorter is padded with silence at the end.

Writing is buffered: a block goes to the file each time both channels hold `FLUSH_S` more, a
sequential write into the page cache that the event loop does itself (a few KB a second per
call; nothing is fsynced).  A file that cannot be written is logged once, removed, and the call
goes on unrecorded (`failed`).  The records store keeps the path (`CallRecorded`), and erasure,
retention and export handle the file (agent/records).
"""
from __future__ import annotations

import logging
import os
import wave
from pathlib import Path

import numpy as np

from .audio import StreamResampler
from .calls import CallContext
from .config import Config
from .records.store import resolve_recordings_dir

log = logging.getLogger(__name__)

#: the recording's rate: the conversation's own (the caller's frames need no resampling)
RECORDING_RATE = 16_000
#: audio of both channels gathered before it is written (seconds)
FLUSH_S = 1.0


class CallRecording:
    """Two channels (caller, agent) into a 16 kHz stereo WAV at ``path``; ``agent_rate``: the playout's rate."""

    def __init__(self, path: Path, agent_rate: int) -> None:
        self.path = path
        self._resample = StreamResampler(agent_rate, RECORDING_RATE)
        self._caller: list[np.ndarray] = []
        self._agent: list[np.ndarray] = []
        self._caller_n = self._agent_n = 0
        self.written = 0          # frames (sample pairs) in the file
        self.failed = False
        self.closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = wave.open(str(path), "wb")  # noqa: SIM115  (open for the whole call; closed by close())
        self._file.setnchannels(2)
        self._file.setsampwidth(2)
        self._file.setframerate(RECORDING_RATE)

    @property
    def seconds(self) -> float:
        return self.written / RECORDING_RATE

    def caller(self, samples: np.ndarray) -> None:
        """A frame of caller audio (int16, 16 kHz), as fed to the conversation."""
        if self.closed or self.failed:
            return
        self._caller.append(np.asarray(samples, np.int16))
        self._caller_n += len(samples)
        self._write(FLUSH_S)

    def agent(self, pcm: np.ndarray, _at: float = 0.0) -> None:
        """A frame the transport took from the playout queue (int16 at the playout's rate; silence too)."""
        if self.closed or self.failed:
            return
        out = self._resample.process(pcm)
        self._agent.append(out)
        self._agent_n += len(out)
        self._write(FLUSH_S)

    def close(self) -> Path | None:
        """Write the rest (the shorter channel padded with silence) and close; the path, or None when the
        recording failed or holds nothing (its file is then removed).  Idempotent."""
        if not self.closed:
            self.closed = True
            if not self.failed:
                self._write(0.0, pad=True)
                try:
                    self._file.close()
                except OSError as exc:
                    self._fail(exc)
            if self.written == 0 and not self.failed:
                self._remove()
        return None if self.failed or self.written == 0 else self.path

    def _write(self, at_least_s: float, *, pad: bool = False) -> None:
        n = max(self._caller_n, self._agent_n) if pad else min(self._caller_n, self._agent_n)
        if n == 0 or n < at_least_s * RECORDING_RATE:
            return
        left, self._caller, self._caller_n = _take(self._caller, n)
        right, self._agent, self._agent_n = _take(self._agent, n)
        stereo = np.empty(2 * n, np.int16)
        stereo[0::2], stereo[1::2] = left, right
        try:
            self._file.writeframes(stereo.astype("<i2").tobytes())
            self.written += n
        except OSError as exc:
            self._fail(exc)

    def _fail(self, error: OSError) -> None:
        log.error("recording %s failed, the call goes on unrecorded: %s", self.path, error)
        self.failed = True
        try:
            self._file.close()
        except OSError:
            pass
        self._remove()

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove the recording %s", self.path)


def _take(chunks: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """The first ``n`` samples of ``chunks`` (zero-padded), and what is left with its length."""
    joined = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    head = np.zeros(n, np.int16)
    head[: min(n, len(joined))] = joined[:n]
    rest = joined[n:]
    return head, ([rest] if len(rest) else []), len(rest)


def open_recording(config: Config, call_id: str, context: CallContext | None, agent_rate: int) -> CallRecording | None:
    """The call's recording when its key or the configuration asks for one (and records are kept), else None.

    A folder or file that cannot be made is logged and the call goes unrecorded."""
    asked = bool(context is not None and context.record_audio) or config.records.record_audio
    if not asked or not config.records.enabled:
        return None
    folder = resolve_recordings_dir(config.records.recordings_dir, config.records.url)
    try:
        return CallRecording(folder / f"{call_id}.wav", agent_rate)
    except OSError as exc:
        log.error("cannot record call %s in %s, it goes on unrecorded: %s", call_id, folder, exc)
        return None
