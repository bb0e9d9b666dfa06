"""G.711 μ-law / A-law, by lookup tables that PyAV's own codecs fill once.

G.711 is memoryless: each 16-bit sample maps to one byte and back, so the
whole codec is two small tables.  Building them by running every value
through FFmpeg's pcm_mulaw/pcm_alaw once keeps FFmpeg's exact rounding
(`audioop` is gone in Python 3.13) and costs one numpy indexing per packet.
"""
from __future__ import annotations

from functools import cache
from typing import cast

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

RATE = 8000
#: RTP static payload types (RFC 3551)
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}
_FFMPEG = {"PCMU": "pcm_mulaw", "PCMA": "pcm_alaw"}


@cache
def _tables(codec: str) -> tuple[np.ndarray, np.ndarray]:
    name = _FFMPEG[codec]
    every = np.arange(-32768, 32768, dtype=np.int16)
    enc = cast(AudioCodecContext, av.CodecContext.create(name, "w"))
    enc.format, enc.layout, enc.sample_rate = "s16", "mono", RATE
    frame = av.AudioFrame.from_ndarray(every.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = RATE
    encoded = b"".join(bytes(p) for p in enc.encode(frame)) + b"".join(bytes(p) for p in enc.encode(None))
    encode = np.frombuffer(encoded, np.uint8)
    assert len(encode) == 65536, len(encode)
    dec = cast(AudioCodecContext, av.CodecContext.create(name, "r"))
    dec.format, dec.layout, dec.sample_rate = "s16", "mono", RATE
    packet = av.Packet(bytes(range(256)))
    decode = np.concatenate([f.to_ndarray().reshape(-1) for f in dec.decode(packet)]).astype(np.int16)
    assert len(decode) == 256, len(decode)
    return encode, decode


def encode(codec: str, pcm: np.ndarray) -> bytes:
    """int16 samples at 8 kHz → G.711 bytes."""
    table, _ = _tables(codec)
    return table[np.asarray(pcm, np.int16).astype(np.int32) + 32768].tobytes()


def decode(codec: str, payload: bytes) -> np.ndarray:
    """G.711 bytes → int16 samples at 8 kHz."""
    _, table = _tables(codec)
    return table[np.frombuffer(payload, np.uint8)]


def silence(codec: str, n: int) -> bytes:
    return encode(codec, np.zeros(n, np.int16))
