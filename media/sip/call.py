"""One answered phone call: RTP in and out around an agent, on one 20 ms clock.

The SIP stack knows no engines.  When a call is answered, the dialog layer
asks its *call factory* (`CallFactory`, given a `CallSetup`) for the agent
that talks on the line — in the server a `Conversation` over the shared
engines (wired in `service.py`), in protocol tests a trivial echo — and runs
it in a `SipCall`:

Caller audio: each G.711 packet is decoded, resampled 8 → 16 kHz (PyAV) and
pushed to the agent stamped with its arrival time.  When the caller's RTP
stops (silence suppression, hold, the end of a test file) the clock feeds
silence instead, so the endpointer still sees the turn end.

Agent audio: the agent's playout queue runs at 8 kHz (the reply resamples
TTS straight to it) and is pulled 160 samples per tick into one RTP packet;
between replies the call sends silence packets.

The call owns one task (`run`, started by the dialog layer); `close()` closes
the agent and the socket.  When the agent asks to hang up (`HangupRequested`),
`run` waits a moment so the far end plays the last words, then returns
"agent hung up" and the dialog layer sends BYE.

Both legs' buffering goes into each turn's ledger (agent/ledger.py), before
the observer sees the turn: the transport part ``jitter_buffer_in`` is the
median time the caller's last words (the 1.5 s before the final transcript)
waited in the reorder buffer (media/sip/jitter.py: packet arrival → handed
to the agent; 0 unless a packet was reordered or lost), with the note
``jitter_buffer_in_max_ms``; the note ``pacing_late_ms`` says how late after
its 20 ms deadline the tick that sent the reply's first packet ran (that
wait is inside voice-to-voice's ``send`` stage).  The far end's own jitter
buffer is not known: a phone reports nothing back (no RTCP here).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.agent.events import Event, HangupRequested, TranscriptEvent, TurnFailed, TurnFinished
from sub300.agent.playout import PlayoutQueue
from sub300.models.protocols import SAMPLE_RATE

from ..pacing import Pacer
from .dtmf import DtmfReceived
from .g711 import RATE
from .rtp import SAMPLES_PER_PACKET, RtpEndpoint
from .sdp import AudioParams

log = logging.getLogger(__name__)
TICK_S = 0.020
SILENCE_AFTER_S = 0.060      # no caller audio for this long: feed silence
MAX_DIGITS = 256             # keys kept per call for the call summary (a flood of events must not grow it)
HANGUP_GRACE_S = 0.4         # after the last reply packet, before BYE: the far end's jitter buffer drains
INBOUND_WINDOW_S = 1.5       # the caller's last words: frames that arrived this long before the final transcript
_KEEP_TURNS = 8


class CallAgent(Protocol):
    """What a SIP call needs of the agent on the line (`sub300.agent.conversation.Conversation` is one).

    ``playout`` runs at `CallSetup.sample_rate` (8 kHz); ``push_frame`` gets
    16 kHz mono int16 frames stamped with their arrival time (clock seconds);
    events the agent sends to ``listeners`` reach the call's observer, and a
    `HangupRequested` among them ends the call.  ``hold``/``unhold`` follow the
    far end's hold (RFC 3264 §8.4), as the dialog layer learns it from re-INVITEs.
    """

    playout: PlayoutQueue
    listeners: list[Callable[[Event], None]]

    def push_frame(self, frame: AudioFrame) -> None: ...

    def push_dtmf(self, digit: str) -> None: ...

    def hold(self) -> None:
        """The far end stopped listening: pause the agent's audio and its turn detection."""

    def unhold(self, drop_rest: bool) -> None:
        """The hold ended: continue the agent's audio where it stopped, or drop the rest."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class CallSetup:
    """What the dialog layer knows of a call when it answers it; handed to the call factory."""

    call_id: str
    caller: str                    #: the From header (caller's address and tag)
    callee: str                    #: the To header, as the caller sent it
    source: tuple[str, int]        #: where the INVITE came from (the caller, or the proxy in front)
    media: AudioParams             #: the negotiated codec and the caller's RTP address
    sample_rate: int               #: the rate the agent's playout queue must run at (Hz)
    clock: Callable[[], float]     #: the clock of every timestamp (seconds)


class CallFactory(Protocol):
    """Makes the agent for an answered call.  May raise: the call is then refused with 500."""

    def __call__(self, setup: CallSetup) -> CallAgent: ...


@dataclass
class SipCall:
    """One answered call's media: RTP endpoint ⇄ agent, paced on a 20 ms clock.

    ``endpoint`` is attached by the dialog layer once its socket is open;
    ``listener`` receives the agent's events and `DtmfReceived` (set when the
    call is reported to the observer); ``digits`` lists the last `MAX_DIGITS`
    keys pressed; ``held`` says whether the far end has the call on hold.
    """

    call_id: str
    agent: CallAgent
    listener: Callable[[Event], None] = lambda event: None
    clock: Callable[[], float] = time.monotonic
    endpoint: RtpEndpoint | None = None
    digits: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_DIGITS))
    held: bool = False

    def __post_init__(self) -> None:
        self.playout = self.agent.playout
        if self.playout.sample_rate != RATE:
            raise ValueError(f"the agent's playout runs at {self.playout.sample_rate} Hz; a SIP call needs {RATE}")
        # the ledger gets the transport's parts before the observer sees the turn
        self.agent.listeners.extend([self._on_event, self._safe_listener])
        self._upsample = StreamResampler(RATE, SAMPLE_RATE)
        self._last_fed = self.clock()
        self._hangup_at: float | None = None
        self.inbound_waits: deque[tuple[float, float]] = deque(maxlen=500)   # (arrival, ms held), 10 s of frames
        self._spurts: deque[tuple[float, float]] = deque(maxlen=32)   # (sent at, ms after its deadline) per talkspurt
        self._talking = False
        self._inbound: dict[int, tuple[float, float]] = {}   # turn → (median, max) ms held of its last words

    # ------------------------------------------------------------ input
    def on_audio(self, pcm: np.ndarray | None, arrival: float) -> None:
        """20 ms of caller audio (8 kHz int16; None for a lost packet) that arrived at ``arrival``."""
        if pcm is None:   # lost packet: 20 ms of silence keeps the timeline honest
            pcm = np.zeros(SAMPLES_PER_PACKET, np.int16)
        samples = self._upsample.process(pcm)
        self.inbound_waits.append((arrival, max(0.0, self.clock() - arrival) * 1000.0))
        if len(samples):
            self.agent.push_frame(AudioFrame(samples, arrival))
        self._last_fed = arrival

    def on_dtmf(self, digit: str, source: str = "rfc4733") -> None:
        """A key the caller pressed (``source``: rfc4733 or info)."""
        self.digits.append(digit)
        log.info("call %s: DTMF %s (%s)", self.call_id, digit, source)
        self._safe_listener(DtmfReceived(digit, source))
        self.agent.push_dtmf(digit)

    def set_held(self, held: bool, *, drop_rest: bool = False) -> None:
        """The far end's hold state from the latest SDP (`AudioParams.held`); ``drop_rest`` on resume
        drops the agent's unplayed audio (``sip.on_resume = "drop"``) instead of continuing it."""
        if held == self.held:
            return
        self.held = held
        log.info("call %s: %s", self.call_id, "on hold" if held else "resumed")
        if held:
            self.agent.hold()
        else:
            self.agent.unhold(drop_rest)

    def _safe_listener(self, event) -> None:
        try:
            self.listener(event)
        except Exception:
            log.exception("call %s: listener failed on %s", self.call_id, type(event).__name__)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, HangupRequested) and self._hangup_at is None:
            self._hangup_at = self.clock() + HANGUP_GRACE_S
        elif isinstance(event, TranscriptEvent) and event.final:
            since = self.clock() - INBOUND_WINDOW_S
            held = sorted(ms for at, ms in self.inbound_waits if at >= since)
            if held:
                self._inbound[event.turn] = (held[len(held) // 2], held[-1])
                while len(self._inbound) > _KEEP_TURNS:
                    del self._inbound[min(self._inbound)]
        elif isinstance(event, TurnFinished | TurnFailed) and event.ledger is not None:
            ledger = event.ledger
            inbound = self._inbound.pop(event.turn, None)
            if inbound is not None:
                ledger.record_transport("jitter_buffer_in", inbound[0])
                ledger.notes["jitter_buffer_in_max_ms"] = round(inbound[1], 1)
            out = ledger.marks.get("first_audio_out")
            late = next((ms for at, ms in self._spurts if out is not None and abs(at - out) <= 0.002), None)
            if late is not None:
                ledger.notes["pacing_late_ms"] = round(late, 1)

    # ------------------------------------------------------------ the clock
    async def run(self) -> str:
        """Send and feed on a 20 ms clock until the agent hangs up; returns the reason."""
        silence16 = np.zeros(SAMPLE_RATE * 20 // 1000, np.int16)

        def tick(deadline: float) -> str | None:
            endpoint = self.endpoint
            if endpoint is not None:
                pcm = self.playout.pull(SAMPLES_PER_PACKET)
                if pcm is not None and not self._talking:
                    now = self.clock()
                    self._spurts.append((now, max(0.0, now - deadline) * 1000.0))
                self._talking = pcm is not None
                endpoint.send(pcm)
                endpoint.expire()
            gap = self.clock() - self._last_fed
            if gap >= SILENCE_AFTER_S:   # the caller's RTP stopped: the missed time is silence
                for _ in range(int(gap / TICK_S)):
                    self._last_fed += TICK_S
                    self.agent.push_frame(AudioFrame(silence16, self._last_fed))
            if self._hangup_at is not None and self.clock() >= self._hangup_at and self.playout.idle:
                return "agent hung up"
            return None

        return await Pacer(TICK_S, self.clock).run(tick)

    async def close(self) -> None:
        """Close the agent (its tasks end) and the RTP socket."""
        await self.agent.aclose()
        if self.endpoint is not None:
            self.endpoint.close()
