"""One answered phone call: RTP in and out around a Conversation, on one 20 ms clock.

Caller audio: each G.711 packet is decoded, resampled 8 → 16 kHz (PyAV) and
pushed to the conversation stamped with its arrival time.  When the caller's
RTP stops (silence suppression, hold, the end of a test file) the clock
feeds silence instead, so the endpointer still sees the turn end.

Agent audio: the playout queue runs at 8 kHz (the reply resamples TTS
straight to it) and is pulled 160 samples per tick into one RTP packet;
between replies the call sends silence packets.

The call owns one task (`run`); `close()` cancels it and closes the
conversation and the socket.  When the agent asks to hang up, `run` waits a
moment so the far end plays the last words, then returns "agent hung up"
and the dialog layer sends BYE.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.agent.config import Config
from sub300.agent.conversation import Conversation
from sub300.agent.engines import Engines
from sub300.agent.events import Event, HangupRequested
from sub300.agent.playout import PlayoutQueue
from sub300.models.protocols import SAMPLE_RATE

from ..pacing import Ticker
from .dtmf import DtmfReceived
from .g711 import RATE
from .rtp import SAMPLES_PER_PACKET, RtpEndpoint

log = logging.getLogger(__name__)
TICK_S = 0.020
SILENCE_AFTER_S = 0.060      # no caller audio for this long: feed silence
HANGUP_GRACE_S = 0.4         # after the last reply packet, before BYE: the far end's jitter buffer drains


@dataclass
class SipCall:
    call_id: str
    engines: Engines
    config: Config
    listener: Callable[[Event], None]
    clock: Callable[[], float] = time.monotonic
    endpoint: RtpEndpoint | None = None
    conversation: Conversation = field(init=False)

    def __post_init__(self) -> None:
        self.playout = PlayoutQueue(RATE, self.clock)
        self.conversation = Conversation(self.engines, self.config, self.playout, self.clock,
                                         listeners=[self._safe_listener, self._on_event])
        self._upsample = StreamResampler(RATE, SAMPLE_RATE)
        self._last_fed = self.clock()
        self._hangup_at: float | None = None
        self.digits: list[str] = []

    # ------------------------------------------------------------ input
    def on_audio(self, pcm: np.ndarray | None, arrival: float) -> None:
        if pcm is None:   # lost packet: 20 ms of silence keeps the timeline honest
            pcm = np.zeros(SAMPLES_PER_PACKET, np.int16)
        samples = self._upsample.process(pcm)
        if len(samples):
            self.conversation.push_frame(AudioFrame(samples, arrival))
        self._last_fed = arrival

    def on_dtmf(self, digit: str, source: str = "rfc4733") -> None:
        self.digits.append(digit)
        log.info("call %s: DTMF %s (%s)", self.call_id, digit, source)
        self._safe_listener(DtmfReceived(digit, source))
        self.conversation.push_dtmf(digit)

    def _safe_listener(self, event) -> None:
        try:
            self.listener(event)
        except Exception:
            log.exception("call %s: listener failed on %s", self.call_id, type(event).__name__)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, HangupRequested) and self._hangup_at is None:
            self._hangup_at = self.clock() + HANGUP_GRACE_S

    # ------------------------------------------------------------ the clock
    async def run(self) -> str:
        """Send and feed on a 20 ms clock until the agent hangs up; returns the reason."""
        ticker = Ticker(TICK_S, self.clock)
        silence16 = np.zeros(SAMPLE_RATE * 20 // 1000, np.int16)
        while True:
            await ticker.wait()
            endpoint = self.endpoint
            if endpoint is not None:
                endpoint.send(self.playout.pull(SAMPLES_PER_PACKET))
                endpoint.expire()
            gap = self.clock() - self._last_fed
            if gap >= SILENCE_AFTER_S:   # the caller's RTP stopped: the missed time is silence
                for _ in range(int(gap / TICK_S)):
                    self._last_fed += TICK_S
                    self.conversation.push_frame(AudioFrame(silence16, self._last_fed))
            if self._hangup_at is not None and self.clock() >= self._hangup_at and self.playout.idle:
                return "agent hung up"

    async def close(self) -> None:
        await self.conversation.aclose()
        if self.endpoint is not None:
            self.endpoint.close()
