"""A scripted WebRTC caller (aiortc): speaks clips, listens, measures mouth-to-ear.

For tests and benchmarks, it does what the demo page does, without a
browser: offers audio plus an "events" data channel to `POST /offer`, sends
its clips on a paced 20 ms track (the same PlayoutTrack the server uses),
and watches the agent's track for the onset of each reply.  Mouth-to-ear is
measured on this process's monotonic clock: from the moment the last frame
of a clip was sent to the moment the first loud frame of the reply came out
of aiortc's jitter buffer and decoder.

Like the page, it reports each onset to the server over the data channel
(an ``ear_report``, media/webrtc/ear_report.py): its mouth-to-ear, the
jitter-buffer wait (``jitter_buffer_ms``) and decoding (``playout_ms``) of
the frames it read around the onset, measured by a `MeasuredJitterBuffer`
on its receiver (``jitter_prefetch`` frames, aiortc's 4 by default, as a
stock aiortc peer has), its RTCP round-trip time and the packets it lost.
``report=False`` sends none.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sub300.agent.audio import resample, rms_dbfs
from sub300.agent.playout import PlayoutQueue
from sub300.media.webrtc.inbound import InboundTimings, to_mono_int16
from sub300.media.webrtc.jitter import AIORTC_PREFETCH, MeasuredJitterBuffer, measure_receiver, receiver_of
from sub300.media.webrtc.outbound import PlayoutTrack

RATE = 48_000
ONSET_DBFS = -55.0       # the server sends digital silence between replies
ONSET_GAP_S = 0.25       # silence needed before a new onset counts


def voiced_end(pcm: np.ndarray, rate: int, floor_dbfs: float = -45.0) -> int:
    """Index just after the last 10 ms block louder than `floor_dbfs` (0 for silence)."""
    n = rate // 100
    blocks = pcm[: len(pcm) // n * n].astype(np.float64).reshape(-1, n)
    loud = np.nonzero(np.sqrt(np.mean(blocks ** 2, axis=1)) / 32768.0 > 10 ** (floor_dbfs / 20))[0]
    return 0 if len(loud) == 0 else int(loud[-1] + 1) * n


@dataclass
class Onset:
    at: float                 # monotonic time the reply's first loud frame was received
    speech_end: float         # monotonic time our clip's last frame was sent
    clip: int

    @property
    def mouth_to_ear_ms(self) -> float:
        return (self.at - self.speech_end) * 1000.0


@dataclass
class AiortcCaller:
    base_url: str
    session: aiohttp.ClientSession
    clock: Callable[[], float] = time.monotonic
    pc: RTCPeerConnection | None = None
    call_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    onsets: list[Onset] = field(default_factory=list)
    received_energy: float = 0.0       # sum of squares of the agent's audio (floats in [-1, 1])
    received_frames: int = 0
    jitter_prefetch: int = AIORTC_PREFETCH
    report: bool = True
    reports: list[dict[str, Any]] = field(default_factory=list)   # what it sent to the server

    def __post_init__(self) -> None:
        self.playout = PlayoutQueue(RATE, self.clock)
        self._track = PlayoutTrack(self.playout, self.clock)
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._clips = 0
        self._speech_end: float | None = None   # the latest clip's end, not yet answered
        self._channel: RTCDataChannel | None = None
        self._buffer: MeasuredJitterBuffer | None = None
        self.timings = InboundTimings()
        self._answering: int | None = None      # the turn whose final transcript came last

    # ------------------------------------------------------------ call set-up
    async def connect(self, timeout: float = 20.0) -> None:
        self.pc = pc = RTCPeerConnection()
        pc.addTrack(self._track)
        self._channel = channel = pc.createDataChannel("events")
        channel.on("message", self._on_message)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and self._reader is None:
                receiver = receiver_of(pc, track)
                if receiver is not None:
                    self._buffer = measure_receiver(receiver, self.jitter_prefetch, self.clock)
                self._reader = asyncio.ensure_future(self._listen(track))

        pc.on("connectionstatechange", self._changed.set)
        await pc.setLocalDescription(await pc.createOffer())
        async with self.session.post(f"{self.base_url}/offer", json={
            "sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
        }) as response:
            body = await response.json()
            if response.status != 200:
                raise ConnectionError(f"offer refused: HTTP {response.status}: {body.get('error')}")
        self.call_id = body["call_id"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        await self.wait_for(lambda: pc.connectionState == "connected", timeout, "connection")

    # ------------------------------------------------------------ speaking and listening
    def say(self, pcm16k: np.ndarray, sample_rate: int = 16_000) -> int:
        """Queue a clip (int16 mono, silences included) on the outgoing track; returns its index.

        The clip's end of speech is its last loud 10 ms block, not its end: the
        moment that block leaves is where mouth-to-ear starts."""
        self._clips += 1
        clip = self._clips

        def ended(at: float) -> None:
            self._speech_end = at

        pcm = resample(pcm16k, sample_rate, RATE)
        end = voiced_end(pcm, RATE)
        self.playout.push(pcm[:end], turn=clip)
        # the first frame after the speech: its send time is the clip's end of speech on the wire
        rest = pcm[end:] if end < len(pcm) else np.zeros(RATE // 100, np.int16)
        self.playout.push(rest, turn=clip, on_first_out=ended)
        return clip

    async def _listen(self, track: MediaStreamTrack) -> None:
        last_loud = -1e9
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = self.clock()
            if self._buffer is not None and (stamps := self._buffer.taken(frame.pts)) is not None:
                self.timings.add(now, *stamps)
            pcm = to_mono_int16(frame)
            self.received_frames += 1
            self.received_energy += float(np.sum(np.square(pcm.astype(np.float64) / 32768.0)))
            if rms_dbfs(pcm) > ONSET_DBFS:
                if now - last_loud >= ONSET_GAP_S and self._speech_end is not None:
                    onset = Onset(now, self._speech_end, self._clips)
                    self.onsets.append(onset)
                    self._speech_end = None
                    self._changed.set()
                    if self.report and self._answering is not None:
                        asyncio.ensure_future(self._report(self._answering, onset))
                last_loud = now

    def _on_message(self, message: Any) -> None:
        event = json.loads(message)
        self.events.append(event)
        if event.get("kind") == "transcript" and event.get("final"):
            self._answering = event.get("turn")
        self._changed.set()

    async def _report(self, turn: int, onset: Onset) -> None:
        """Send the server an ear_report for ``turn``: what this caller measured of its reply's onset."""
        report: dict[str, Any] = {"type": "ear_report", "turn": turn, "mouth_to_ear_ms": onset.mouth_to_ear_ms}
        waits = self.timings.around(onset.at, before_s=0.2, after_s=0.0)
        if waits is not None:
            report["jitter_buffer_ms"], report["playout_ms"] = waits
        assert self.pc is not None
        for sender in self.pc.getSenders():
            for stats in (await sender.getStats()).values():
                if stats.type == "remote-inbound-rtp" and getattr(stats, "roundTripTime", None) is not None:
                    report["rtt_ms"] = stats.roundTripTime * 1000.0
        for receiver in self.pc.getReceivers():
            for stats in (await receiver.getStats()).values():
                if stats.type == "inbound-rtp":
                    report["packets_lost"] = max(0, stats.packetsLost)
        self.reports.append(report)
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(json.dumps(report))

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"caller {self.call_id}: no {what} within {timeout:.0f} s") from None

    async def wait_for_turns(self, n: int, timeout: float) -> list[dict[str, Any]]:
        await self.wait_for(lambda: len(self.events_of("turn")) >= n, timeout, f"{n} finished turn(s)")
        return self.events_of("turn")

    # ------------------------------------------------------------ ending
    async def hang_up(self) -> None:
        """Politely: tell the server, give the message a moment to leave, then close."""
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(json.dumps({"type": "hangup"}))
            await asyncio.sleep(0.1)
        await self.vanish()

    def disappear(self) -> None:
        """Drop off the network with no goodbye at all (a laptop lid shut, Wi-Fi gone): no RTCP BYE,
        no DTLS close_notify, no SCTP ABORT, no more RTP or ICE consent answers.  The caller's
        sockets are closed under aiortc; `vanish()` afterwards cleans up this side."""
        assert self.pc is not None
        transports = {t.receiver.transport for t in self.pc.getTransceivers()}
        if self.pc.sctp is not None:
            transports.add(self.pc.sctp.transport)
        for dtls in transports:
            for protocol in list(dtls.transport._connection._protocols):
                if protocol.transport is not None:
                    protocol.transport.close()

    async def vanish(self) -> None:
        """Close the peer connection with no goodbye (a closed tab, a lost phone)."""
        self._track.stop()
        if self.pc is not None:
            await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
