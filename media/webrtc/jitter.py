"""aiortc's audio jitter buffer, measured and with a configurable prefetch.

aiortc (1.16, ``aiortc/rtcrtpreceiver.py``) gives every audio receiver
``JitterBuffer(capacity=16, prefetch=4)``: a frame is released only once 4
more frames stand behind it, so each 20 ms Opus frame waits 80 ms after its
packet arrived, on a quiet loopback as on a real network.  A browser's NetEq
adapts its target to the jitter it sees (a few ms on loopback); aiortc's
buffer does not adapt, and its release is the only thing it does with the
delay (the decoder needs frames in order, not on time).  For a voice agent
the caller's audio feeds a VAD and a recogniser, which need every frame in
order but no smooth playout, so a prefetch of 1 (the next frame's packet
proves the frame complete; a packet one frame late is still put in order)
is enough on any network whose jitter stays under a frame.  Prefetch 0
releases each packet as it arrives (one Opus packet is one frame) and drops
a packet that comes after a later one.

`measure_receiver(receiver, prefetch)` replaces the receiver's buffer (a
private attribute, ``_RTCRtpReceiver__jitter_buffer``, set once in its
constructor and read on each packet) with `MeasuredJitterBuffer` before any
packet arrives; aiortc offers no public seam for this, and forking it for
one constructor argument would cost more than this one line.  The buffer
stamps each packet's arrival and each frame's release on the monotonic
clock, keyed by the RTP timestamp as aiortc's `TimestampMapper` maps it (the
decoded frame's ``pts``), so the reader can take a frame's whole way in:
arrival → released (the buffer's wait) → decoded and read (the decoder
thread).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)
#: aiortc's own audio buffer: ``JitterBuffer(capacity=16, prefetch=4)`` (rtcrtpreceiver.py)
AIORTC_CAPACITY, AIORTC_PREFETCH = 16, 4
#: frames whose arrival is kept until the reader takes them (5 s of 20 ms frames)
_KEEP = 250
_PRIVATE = "_RTCRtpReceiver__jitter_buffer"


class MeasuredJitterBuffer(JitterBuffer):
    """aiortc's `JitterBuffer`, stamping arrival and release times (``clock`` seconds) per frame.

    ``taken(pts)`` → (arrival, release) of the frame whose mapped RTP timestamp is ``pts``
    (its first packet's arrival), or None when it was not seen (or already taken).
    """

    def __init__(self, capacity: int = AIORTC_CAPACITY, prefetch: int = AIORTC_PREFETCH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(capacity=capacity, prefetch=prefetch)
        self.clock = clock
        self._arrivals: OrderedDict[int, float] = OrderedDict()   # raw RTP timestamp → first arrival
        self._released: OrderedDict[int, tuple[float, float]] = OrderedDict()   # mapped pts → (arrival, release)
        self._origin_ts: int | None = None
        self._last_ts: int | None = None
        #: packets dropped because a later one was already released (prefetch 0 only)
        self.dropped_late = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        now = self.clock()
        self._arrivals.setdefault(packet.timestamp, now)
        while len(self._arrivals) > _KEEP:
            self._arrivals.popitem(last=False)
        pli, frame = self._add_at_once(packet) if self._prefetch == 0 else super().add(packet)
        if frame is not None:
            arrival = self._arrivals.pop(frame.timestamp, now)
            self._released[self._map(frame.timestamp)] = (arrival, now)
            while len(self._released) > _KEEP:
                self._released.popitem(last=False)
        return pli, frame

    def _add_at_once(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """Prefetch 0: an audio packet is a whole frame (Opus, RFC 7587 §4.2; G.711), released on arrival
        unless it is older than the last one released (then dropped: the decoder needs order)."""
        if self._origin is not None and uint16_add(packet.sequence_number, -self._origin) >= 0x8000:
            self.dropped_late += 1
            return False, None
        self._origin = uint16_add(packet.sequence_number, 1)
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]

    def _map(self, timestamp: int) -> int:
        """aiortc's `TimestampMapper.map`, the same arithmetic on the same released frames."""
        if self._origin_ts is None:
            self._origin_ts = timestamp
        elif self._last_ts is not None and timestamp < self._last_ts:
            self._origin_ts -= 1 << 32
        self._last_ts = timestamp
        return timestamp - self._origin_ts

    def taken(self, pts: int | None) -> tuple[float, float] | None:
        if pts is None:
            return None
        return self._released.pop(pts, None)


def measure_receiver(receiver: Any, prefetch: int = AIORTC_PREFETCH,
                     clock: Callable[[], float] = time.monotonic) -> MeasuredJitterBuffer | None:
    """Give an audio `RTCRtpReceiver` a `MeasuredJitterBuffer` (before its first packet); None if aiortc
    changed and the seam is gone (logged: the call goes on with aiortc's own buffer, unmeasured)."""
    if not isinstance(getattr(receiver, _PRIVATE, None), JitterBuffer):
        log.error("aiortc's RTCRtpReceiver has no %s any more: the inbound jitter buffer is not measured "
                  "and keeps aiortc's prefetch", _PRIVATE)
        return None
    buffer = MeasuredJitterBuffer(prefetch=prefetch, clock=clock)
    setattr(receiver, _PRIVATE, buffer)
    return buffer


def receiver_of(pc: Any, track: Any) -> Any:
    """The RTCRtpReceiver of ``track`` in peer connection ``pc``, or None."""
    for receiver in pc.getReceivers():
        if receiver.track is track:
            return receiver
    return None
