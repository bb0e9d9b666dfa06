"""One browser call: an aiortc peer connection glued to its own Conversation.

    caller's track ─ read_caller_audio ─▶ Conversation.push_frame
    Conversation ─▶ PlayoutQueue ─ PlayoutTrack (paced 20 ms, 48 kHz) ─▶ caller
    Conversation events ─▶ JSON on the caller's data channel (and the observer)

The call owns its tasks through a `TaskOwner` (``tasks``: the closing task;
its child ``tasks/io``: the inbound reader, the watchdog and the hang-up timer) and its
conversation; `close()` is idempotent, safe from any callback, and leaves
nothing running: reader cancelled, track stopped, conversation closed, peer
connection closed, observer told exactly once.  It ends on the page's
hang-up message, the agent's own hang-up (a goodbye, or a call limit of
agent/call_limits.py: inactivity or maximum length, reason
"agent_hangup: inactivity" …), ICE/DTLS failure or closure, the end of the
caller's track, or server shutdown (at once, or politely when the server
drains: `end_politely`, the current turn then the drain goodbye, reason
"agent_hangup: drain"); and by the watchdog:

* ``connect_timeout`` — not connected ``webrtc.connect_timeout_s`` after the
  answer (an offer whose candidates lead nowhere must not hold a slot);
* ``caller vanished`` — connected, but no caller audio out of aiortc for
  ``webrtc.no_media_timeout_s`` (10 s by default).  A browser sends RTP all
  the time, silence and muted microphones included, so this means the
  caller is gone.  It does not wait for ICE consent freshness (RFC 7675 §5.1):
  aioice checks consent every 5 s ±20 % and gives up after 6 misses, about
  30–35 s, and only then does aiortc fail the connection.

Measured on loopback (a caller whose sockets are closed under aiortc, no
goodbye sent): the old per-`recv()` 20 s timeout freed the call after 20.1 s;
with that timeout out of the way, ICE consent failure alone closed the
connection after 32.3 s.  The ~54 s seen in the field was not reproduced
here; it is what the two add up to (20 + 33 ≈ 54 s) when the reader's
per-`recv()` timeout is re-armed by one late frame around the consent
failure.  The watchdog does not depend on either: it measures from the
caller's last frame, on its own timer.

To the caller's ear: the caller's side sends an ``ear_report`` per answered
turn (media/webrtc/ear_report.py: its mouth-to-ear, its jitter buffer and
round-trip time).  The call keeps it until the turn's `TurnFinished` (a reply
is heard long before it ends), then records it with the server's own
measurements (the inbound jitter buffer and decoder of media/webrtc/jitter.py
and inbound.py, the RTCP round-trip time) in the turn's ledger and emits
`TurnHeard` to the page and the observer (the metrics).  A report that comes
after its turn finished is applied at once.  A malformed or hostile report is
logged and ignored; the call goes on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from sub300.agent.audio import AudioFrame
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.call_limits import INACTIVITY, MAX_DURATION
from sub300.agent.calls import CallContext, CallObserver
from sub300.agent.config import Config
from sub300.agent.conversation import DRAIN, Conversation
from sub300.agent.engines import Engines
from sub300.agent.events import (
    Event,
    HangupRequested,
    TranscriptEvent,
    TurnFailed,
    TurnFinished,
    TurnHeard,
    event_to_dict,
)
from sub300.agent.ledger import TurnLedger
from sub300.agent.log_format import call_context
from sub300.agent.playout import PlayoutQueue
from sub300.agent.recording import open_recording
from sub300.agent.tasks import TaskOwner

from .ear_report import KIND as EAR_REPORT
from .ear_report import BadReport, EarReport, apply_report, parse_message, parse_report
from .inbound import CallerAudioStopped, InboundTimings, read_caller_audio
from .jitter import MeasuredJitterBuffer, measure_receiver, receiver_of
from .outbound import PlayoutTrack

log = logging.getLogger(__name__)
TRANSPORT = "webrtc"
PLAYOUT_RATE = 48_000
#: after the agent's goodbye has been pulled, let the last frames cross the network before closing
_HANGUP_GRACE_S = 0.6
#: events queued while the data channel is not open yet; older ones are dropped beyond this
_MAX_BACKLOG = 500
#: the watchdog's period (s): the resolution of connect_timeout_s, no_media_timeout_s and the call limits
WATCH_PERIOD_S = 0.25
VANISHED = "caller vanished"
#: turns whose report or ledger is kept for a late counterpart
_KEEP_TURNS = 8
#: bad reports logged per call (then every 100th)
_BAD_REPORTS_LOGGED = 5
#: how often (watchdog periods) the RTCP round-trip time is read
_RTT_EVERY = 4


class WebRtcCall:
    """One browser call: ``pc`` (a fresh RTCPeerConnection) carrying a Conversation over ``engines``.

    `accept(offer)` returns the answer; the call then runs on aiortc's
    callbacks until something ends it (see the module docstring).
    ``on_closed(call)`` runs once, after the observer's `call_ended`.
    ``context``: who the call belongs to (its API key, the caller's address), for the observers.
    """

    def __init__(
        self,
        call_id: str,
        pc: RTCPeerConnection,
        engines: Engines,
        config: Config,
        observer: CallObserver,
        on_closed: Callable[[WebRtcCall], None] = lambda call: None,
        clock: Callable[[], float] = time.monotonic,
        context: CallContext | None = None,
        behaviour: Behaviour = DEFAULT_BEHAVIOUR,
    ) -> None:
        self.call_id = call_id
        self.context = context or CallContext()
        self.pc = pc
        self.config = config
        self.observer = observer
        self.clock = clock
        self._on_closed = on_closed
        self.playout = PlayoutQueue(PLAYOUT_RATE, clock)
        self.out_track = PlayoutTrack(self.playout, clock)
        self.listener = listener = observer.call_started(TRANSPORT, call_id, self.context)
        self.conversation = Conversation(engines, config, self.playout, clock, listeners=[listener, self._on_event],
                                         behaviour=behaviour)
        self.conversation.record_to(open_recording(config, call_id, self.context, PLAYOUT_RATE))
        self.tasks = TaskOwner(f"webrtc-{call_id}")
        self._io = self.tasks.child("io")   # what closing cancels: the reader, the hang-up timer
        self.reader: asyncio.Task | None = None
        self.close_reason: str | None = None
        self._closing: asyncio.Task | None = None
        self._hangup: asyncio.Task | None = None
        self._channel = None
        self._backlog: list[str] = []
        self._engines = engines
        self.started = clock()
        self.connected_at: float | None = None
        self.last_audio: float | None = None     # clock time of the caller's latest decoded frame
        self._watchdog: asyncio.Task | None = None
        self.inbound = InboundTimings()
        self.jitter_buffer: MeasuredJitterBuffer | None = None
        self.rtt_ms: float | None = None          # RTCP round-trip time of our outgoing audio, when known
        self._inbound_at_final: dict[int, tuple[float, float]] = {}   # turn → inbound waits of its last words
        self._reports: dict[int, EarReport] = {}      # reports waiting for their turn's ledger
        self._ledgers: dict[int, TurnLedger] = {}     # finished turns' ledgers, for a late report
        self._heard: set[int] = set()
        self.bad_reports = 0

        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    # ------------------------------------------------------------ set-up
    async def accept(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Apply the caller's offer and return our answer (host candidates included).

        The call's tasks start in here (the reader on the track event, the watchdog, aiortc's
        transports), inside the call's log context: their log lines carry its call id and key id."""
        with call_context(self.call_id, self.context.key_id):
            await self.pc.setRemoteDescription(offer)
            self.pc.addTrack(self.out_track)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            if self._watchdog is None and not self._io.closed:
                self._watchdog = self._io.spawn(self._watch(), f"webrtc-watch-{self.call_id}")
        return self.pc.localDescription

    async def _watch(self) -> None:
        """Every `WATCH_PERIOD_S`: connect timeout, vanished caller, call limits (see the module docstring)."""
        webrtc = self.config.webrtc
        ticks = 0
        while self.close_reason is None:
            await asyncio.sleep(WATCH_PERIOD_S)
            ticks += 1
            if ticks % _RTT_EVERY == 0 and self.connected_at is not None:
                await self._read_rtt()
            now = self.clock()
            if self.connected_at is None:
                if now - self.started >= webrtc.connect_timeout_s:
                    self.request_close("connect_timeout")
                    return
                continue
            heard = self.last_audio if self.last_audio is not None else self.connected_at
            if now - heard >= webrtc.no_media_timeout_s:
                log.info("call %s: no audio from the caller for %.1f s", self.call_id, now - heard)
                self.request_close(VANISHED)
                return
            self.conversation.check_limits()   # frames may have stopped: the conversation cannot check itself

    async def _read_rtt(self) -> None:
        """The RTCP round-trip time of our audio (aiortc's sender: remote-inbound-rtp roundTripTime)."""
        try:
            for sender in self.pc.getSenders():
                if sender.track is not self.out_track:
                    continue
                for stats in (await sender.getStats()).values():
                    rtt = getattr(stats, "roundTripTime", None)
                    if stats.type == "remote-inbound-rtp" and rtt is not None:
                        self.rtt_ms = rtt * 1000.0
        except Exception:   # statistics must never end a call
            log.warning("call %s: reading the RTCP round-trip time failed", self.call_id, exc_info=True)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self.reader is not None or self.close_reason is not None:
            return  # one caller voice per call; video is ignored
        receiver = receiver_of(self.pc, track)
        if receiver is not None:   # before its first packet: the track event comes with the remote description
            self.jitter_buffer = measure_receiver(receiver, self.config.webrtc.jitter_prefetch_frames, self.clock)
        self.reader = self._io.spawn(self._read(track), f"webrtc-read-{self.call_id}")

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            await read_caller_audio(track, self._caller_frame, clock=self.clock,
                                    silence_timeout_s=self.config.webrtc.no_media_timeout_s,
                                    buffer=self.jitter_buffer, timings=self.inbound)
            self.request_close("track_ended")
        except CallerAudioStopped:
            self.request_close(VANISHED)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("call %s: reading caller audio failed", self.call_id)
            self.request_close(f"error: {error!r}")

    def _caller_frame(self, frame: AudioFrame) -> None:
        self.last_audio = frame.timestamp
        self.conversation.push_frame(frame)

    def _on_datachannel(self, channel) -> None:
        self._channel = channel
        channel.on("open", self._flush_backlog)
        channel.on("message", self._on_message)
        self._send({"kind": "hello", "call_id": self.call_id, "budget_ms": self.config.budget_ms,
                    "engines": self._engines.describe()})
        self._flush_backlog()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("call %s: connection %s", self.call_id, state)
        if state == "connected" and self.connected_at is None:
            self.connected_at = self.clock()
        if state in ("failed", "closed"):
            self.request_close(f"connection_{state}")

    # ------------------------------------------------------------ events to the page
    def _on_event(self, event: Event) -> None:
        self._send(event_to_dict(event))
        if isinstance(event, TranscriptEvent) and event.final:
            # the caller's last words were read within the last second or so (endpoint + final STT)
            waits = self.inbound.around(self.clock(), before_s=1.5, after_s=0.0)
            if waits is not None:
                self._keep(self._inbound_at_final, event.turn, waits)
        elif isinstance(event, TurnFinished | TurnFailed) and event.ledger is not None:
            self._keep(self._ledgers, event.turn, event.ledger)
            report = self._reports.pop(event.turn, None)
            if report is not None:
                self._record_heard(event.ledger, report)
        if isinstance(event, HangupRequested) and self._hangup is None and not self._io.closed:
            self._hangup = self._io.spawn(self._hang_up_after_grace(event.reason), f"webrtc-hangup-{self.call_id}")

    async def _hang_up_after_grace(self, reason: str) -> None:
        await asyncio.sleep(_HANGUP_GRACE_S)
        self.request_close(f"agent_hangup: {reason}" if reason in (INACTIVITY, MAX_DURATION, DRAIN) else "agent_hangup")

    def _on_message(self, message: Any) -> None:
        try:
            data = parse_message(message)
            if data is None:
                return
            if data.get("type") == "hangup":
                self.request_close("hangup")
            elif data.get("type") == EAR_REPORT:
                self._on_report(parse_report(data))
        except BadReport as bad:
            self.bad_reports += 1
            if self.bad_reports <= _BAD_REPORTS_LOGGED or self.bad_reports % 100 == 0:
                log.warning("call %s: ignored a bad ear_report from the caller (%d so far): %s",
                            self.call_id, self.bad_reports, bad)

    def _on_report(self, report: EarReport) -> None:
        if report.turn in self._heard:
            raise BadReport(f"a second report for turn {report.turn}")
        ledger = self._ledgers.get(report.turn)
        if ledger is not None:
            self._record_heard(ledger, report)
        else:   # the oldest waiting report goes first (its turn was discarded, or never came)
            self._keep(self._reports, report.turn, report)

    def _record_heard(self, ledger: TurnLedger, report: EarReport) -> None:
        self._heard.add(report.turn)
        inbound = self._inbound_at_final.pop(report.turn, None)
        if inbound is None and "speech_end" in ledger.marks:
            inbound = self.inbound.around(ledger.marks["speech_end"])
        quiet_lead = None
        if "first_audio_out" in ledger.marks:
            sound = self.out_track.first_sound_after(ledger.marks["first_audio_out"])
            if sound is not None:
                quiet_lead = max(0.0, sound - ledger.marks["first_audio_out"]) * 1000.0
        apply_report(ledger, report, inbound=inbound, rtt_ms=self.rtt_ms, quiet_lead_ms=quiet_lead)
        if self.inbound.unmatched:
            ledger.notes["inbound_unmatched_frames"] = self.inbound.unmatched
        if self.jitter_buffer is not None and self.jitter_buffer.dropped_late:
            ledger.notes["inbound_dropped_late"] = self.jitter_buffer.dropped_late   # the call so far
        log.info("call %s turn %d: voice-to-voice %s ms, mouth-to-ear %s ms estimated, %s ms reported",
                 self.call_id, report.turn, _ms(ledger.voice_to_voice_ms), _ms(ledger.mouth_to_ear_estimate_ms),
                 _ms(ledger.mouth_to_ear_reported_ms))
        heard = TurnHeard(report.turn, ledger)
        self._send(event_to_dict(heard))
        self.listener(heard)

    @staticmethod
    def _keep(store: dict, turn: int, value: Any) -> None:
        store[turn] = value
        while len(store) > _KEEP_TURNS:
            del store[min(store)]

    def _send(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, ensure_ascii=False)
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif self.close_reason is None:
            self._backlog.append(text)
            del self._backlog[:-_MAX_BACKLOG]

    def _flush_backlog(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        backlog, self._backlog = self._backlog, []
        for text in backlog:
            channel.send(text)

    # ------------------------------------------------------------ teardown
    def end_politely(self, goodbye: str) -> None:
        """The server drains (sub300/drain.py): the current turn ends, the agent says ``goodbye`` and the
        call closes after it has played (reason "agent_hangup: drain"); a call not connected yet closes now."""
        if self.close_reason is not None or self._closing is not None:
            return
        if self.connected_at is None:
            self.request_close(DRAIN)
        elif not self.conversation.end_politely(DRAIN, goodbye):
            log.info("call %s: already ending (%s); the drain waits for it", self.call_id,
                     self.conversation.ended_by.reason if self.conversation.ended_by else "closed")

    def request_close(self, reason: str) -> None:
        """From any callback: start closing (once); `close()` awaits the same work."""
        if self._closing is None:
            self._closing = self.tasks.spawn(self._close(reason), f"webrtc-close-{self.call_id}")

    async def close(self, reason: str = "closed") -> None:
        """Close the call (once; later reasons are ignored) and wait until nothing of it runs."""
        self.request_close(reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    @property
    def closed(self) -> bool:
        return self._closing is not None and self._closing.done()

    async def _close(self, reason: str) -> None:
        self.close_reason = reason
        log.info("call %s: closing (%s)", self.call_id, reason)
        try:
            await self._io.aclose()
            self.out_track.stop()
            await self.conversation.aclose()
            await self.pc.close()
        except Exception:
            if self._watchdog is None:
                # aiortc cannot close a peer connection whose offer it refused half-way (its
                # transports are None); nothing was gathered or started, so nothing is left open
                log.debug("call %s: closing a refused peer connection", self.call_id, exc_info=True)
            else:
                log.exception("call %s: error while closing", self.call_id)
        finally:
            self.observer.call_ended(TRANSPORT, self.call_id, reason)
            self._on_closed(self)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"
