"""One call over a WebSocket media stream: a Conversation driven by the one 20 ms clock, whatever the wire.

    client ─ caller audio (wire rate) ─▶ caller_audio ─ budget, 16 kHz ─▶ Conversation.push_frame
    Conversation ─▶ HeardPlayout (wire rate) ─ pulled on the 20 ms tick, up to ``lead_s`` ahead ─▶ outbox ─▶ client
    client ─ mark(seq) ─▶ heard ─▶ the ledger's first_audio_heard; the history's barge-in truncation

The wire's format lives in a `Wire` (media/websocket/twilio.py: JSON
``media`` + ``mark`` per frame, ``clear``; pcm.py: binary frames, JSON
events); this class is the same for both.  Its tasks (the paced clock and
the writer) belong to one `TaskOwner`; `close()` is idempotent and leaves
nothing running: tasks cancelled and awaited, conversation closed, observer
told exactly once (``call_ended``), ``on_closed`` called.

The clock (`Pacer`, media/pacing.py) ticks every 20 ms and, in order:

* feeds silence when the client's audio stopped for 60 ms (as a SIP call
  does: the endpointer must see the turn end), and ends the call as
  ``caller vanished`` after `NO_MEDIA_TIMEOUT_S` without a message;
* sends the agent's audio ahead of the far end's ear by at most ``lead_s``:
  it models the provider's buffer as playing in real time from when audio
  is sent into it, and pulls a frame while that buffer holds less than
  ``lead_s``.  Twilio: 100 ms — enough to ride over a late tick or a
  jittery uplink (Twilio's media arrives every 20 ms), and what a barge-in
  must clear; PCM: one frame (real time, no marks to learn what was played);
* hangs up after the agent's `HangupRequested` (a goodbye, a call limit, the
  drain) once the queue is empty and every mark is back (or
  `HANGUP_GRACE_S` after the last frame without marks), returning
  ``agent_hangup[: reason]``.

What the caller heard (media/websocket/heard.py): with marks, a frame counts
as played when its mark comes back; a barge-in pause, a flush or a call
limit takes back every unconfirmed frame (the history then keeps only what
the marks confirmed) and sends the wire's ``clear``.  The first mark of a
turn's reply gives its ledger the transport part ``playout`` = mark back −
``first_audio_out`` − 20 ms (the frame's own length: the provider echoes a
mark once the audio before it finished playing): the provider's send,
network out, its buffer and the mark's way back (an upper bound of the
outbound path: the return trip is inside), with the note
``heard_by = "mark"``, then ``first_audio_heard`` (`TurnLedger.record_heard`)
and a `TurnHeard` event after the turn's `TurnFinished`, as WebRTC does.

Input that breaks the rules never ends the call: the wire's parser raises,
`bad_input` logs it (the first 10, then every 100th) and counts it.  A
client sending audio faster than real time is held to real time plus
`INBOUND_BURST_S` (the excess is dropped, counted, logged once).  The
outbox is bounded (`MAX_OUTBOX` messages): a client that does not read
ends the call (``client not reading``); one write that takes longer than
`SEND_TIMEOUT_S` too.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.call_limits import INACTIVITY, MAX_DURATION
from sub300.agent.calls import CallContext, CallObserver
from sub300.agent.config import Config
from sub300.agent.conversation import DRAIN, Conversation
from sub300.agent.engines import Engines
from sub300.agent.events import Event, HangupRequested, TurnFailed, TurnFinished, TurnHeard, event_to_dict
from sub300.agent.ledger import TurnLedger
from sub300.agent.log_format import call_context
from sub300.agent.recording import open_recording
from sub300.agent.tasks import TaskOwner
from sub300.models.protocols import SAMPLE_RATE

from ..pacing import Pacer
from .heard import HeardPlayout

log = logging.getLogger(__name__)
TICK_S = 0.020
#: no caller audio for this long: the clock feeds silence (the endpointer must see the turn end)
SILENCE_AFTER_S = 0.060
#: no message at all from the client for this long: it is gone (a provider streams audio all the time)
NO_MEDIA_TIMEOUT_S = 10.0
#: caller audio accepted beyond real time (a burst after a network stall); the rest is dropped
INBOUND_BURST_S = 1.0
#: without marks: after the last frame, before hanging up (the far end plays what it buffered)
HANGUP_GRACE_S = 0.4
#: with marks: the longest wait for the last marks before hanging up anyway
MARKS_WAIT_S = 2.0
#: one write to the socket may take this long; then the client is taken as not reading
SEND_TIMEOUT_S = 5.0
#: messages waiting to be written at most (about 2.5 s of audio with its marks)
MAX_OUTBOX = 256
VANISHED = "caller vanished"
_BAD_LOGGED = 10
_KEEP_TURNS = 8


class Wire(Protocol):
    """A stream's format: what one frame of agent audio, a clear and an event become on the socket.

    Each returns the messages to send (``str``: a text frame, ``bytes``: a binary frame)."""

    def audio(self, pcm: np.ndarray, seq: int) -> list[str | bytes]: ...

    def clear(self) -> list[str | bytes]: ...

    def event(self, payload: dict[str, Any]) -> list[str | bytes]: ...


class Socket(Protocol):
    """What the call writes to (aiohttp's `WebSocketResponse` is one)."""

    async def send_str(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...


class WebSocketCall:
    """One call over a WebSocket media stream (see the module docstring).

    ``transport``: its name for the observer and the metrics ("twilio", "pcm"); ``wire_rate``: the
    stream's sample rate (Hz), both ways; ``lead_s``: how far ahead of the far end's ear audio is sent;
    ``marks``: whether the far end confirms what it played (`mark_played`); without marks each frame
    counts as played when sent.  ``on_closed(call)`` runs once, after the observer's ``call_ended``.
    """

    def __init__(self, call_id: str, transport: str, wire: Wire, socket: Socket, engines: Engines, config: Config,
                 observer: CallObserver, *, wire_rate: int, lead_s: float, marks: bool,
                 clock: Callable[[], float] = time.monotonic, context: CallContext | None = None,
                 behaviour: Behaviour = DEFAULT_BEHAVIOUR,
                 on_closed: Callable[[WebSocketCall], None] = lambda call: None) -> None:
        if lead_s < TICK_S:
            raise ValueError(f"lead_s must be at least one frame ({TICK_S} s), not {lead_s}")
        self.call_id = call_id
        self.transport = transport
        self.wire = wire
        self.socket = socket
        self.config = config
        self.observer = observer
        self.clock = clock
        self.context = context or CallContext()
        self.wire_rate = wire_rate
        self.frame = wire_rate * 20 // 1000
        self.lead_s = lead_s
        self.marks = marks
        self._on_closed = on_closed
        self.playout = HeardPlayout(wire_rate, clock, on_unsent=self._on_unsent)
        self.listener = observer.call_started(transport, call_id, self.context)
        self.conversation = Conversation(engines, config, self.playout, clock,
                                         listeners=[self._on_event, self._safe_listener], behaviour=behaviour)
        self.conversation.record_to(open_recording(config, call_id, self.context, wire_rate))
        self.tasks = TaskOwner(f"{transport}-{call_id}")
        self.started = clock()
        self.close_reason: str | None = None
        self._closing: asyncio.Task | None = None
        self._upsample = StreamResampler(wire_rate, SAMPLE_RATE)
        self._last_fed = self._last_message = self.started
        self._received = 0                  # caller samples accepted (wire rate)
        self.dropped_samples = 0            # caller samples dropped: faster than real time
        self.bad_messages = 0
        self._buffer_end = self.started     # when the far end's buffer of our audio runs out (clock seconds)
        self._last_sent = self.started
        self._outbox: deque[tuple[str, str | bytes]] = deque()   # (kind, message); kind "audio" | "control"
        self._wake = asyncio.Event()
        self._stop: str | None = None       # a reason to end, from outside the clock
        self._hangup: str | None = None     # the agent's hang-up reason, once asked
        self._hangup_since: float | None = None
        self._heard_at: dict[int, float] = {}        # turn → when its first frame's mark came back
        self._ledgers: dict[int, TurnLedger] = {}    # finished turns waiting for their first mark
        self._reported: set[int] = set()
        #: set when the clock stopped: ``stop_reason`` says why; the handler closes the socket, then the call
        self.ended = asyncio.Event()

    # ------------------------------------------------------------ life
    def start(self) -> None:
        """Start the clock and the writer (call once, from the event loop)."""
        with call_context(self.call_id, self.context.key_id):
            self.tasks.spawn(self._run(), f"{self.transport}-clock-{self.call_id}")
            self.tasks.spawn(self._write(), f"{self.transport}-write-{self.call_id}")

    def send_event(self, payload: dict[str, Any]) -> None:
        """A control message to the client (the wire decides whether it has such messages)."""
        for message in self.wire.event(payload):
            self._queue("control", message)

    def end(self, reason: str) -> None:
        """End the call at the next tick (the client said stop or hang up, the socket closed)."""
        if self._stop is None:
            self._stop = reason

    def end_politely(self, goodbye: str) -> None:
        """The server drains (sub300/drain.py): the current turn ends, the agent says ``goodbye``, the call
        hangs up after it has played (reason "agent_hangup: drain")."""
        if self.close_reason is None and not self.conversation.end_politely(DRAIN, goodbye):
            log.info("call %s: already ending; the drain waits for it", self.call_id)

    async def close(self, reason: str = "closed") -> None:
        """Close the call (once; later reasons are ignored) and wait until nothing of it runs."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(reason))
        await asyncio.shield(self._closing)

    @property
    def closed(self) -> bool:
        return self._closing is not None and self._closing.done()

    async def _close(self, reason: str) -> None:
        self.close_reason = reason
        log.info("%s call %s: closing (%s)", self.transport, self.call_id, reason)
        try:
            await self.tasks.aclose()
            await self.conversation.aclose()
        except Exception:
            log.exception("%s call %s: error while closing", self.transport, self.call_id)
        finally:
            if self.dropped_samples:
                log.info("%s call %s: %.1f s of caller audio dropped (sent faster than real time)",
                         self.transport, self.call_id, self.dropped_samples / self.wire_rate)
            self.observer.call_ended(self.transport, self.call_id, reason)
            self._on_closed(self)

    # ------------------------------------------------------------ from the client
    def caller_audio(self, pcm: np.ndarray) -> None:
        """Caller audio at the wire rate (int16), just received."""
        now = self._last_message = self.clock()
        allowed = (now - self.started + INBOUND_BURST_S) * self.wire_rate
        if self._received + len(pcm) > allowed:
            if not self.dropped_samples:
                log.warning("%s call %s: caller audio faster than real time: the excess is dropped",
                            self.transport, self.call_id)
            self.dropped_samples += len(pcm)
            return
        self._received += len(pcm)
        samples = self._upsample.process(pcm)
        if len(samples):
            self.conversation.push_frame(AudioFrame(samples, now))
        self._last_fed = now

    def heard_from(self) -> None:
        """Any message from the client (it is alive)."""
        self._last_message = self.clock()

    def mark_played(self, seq: int) -> None:
        """The far end played our frames up to ``seq`` (its mark came back)."""
        now = self.clock()
        for turn in self.playout.confirm(seq):
            self._heard_at[turn] = now
            while len(self._heard_at) > _KEEP_TURNS:
                del self._heard_at[min(self._heard_at)]
            ledger = self._ledgers.pop(turn, None)
            if ledger is not None:
                self._record_heard(turn, ledger)

    def dtmf(self, digit: str) -> None:
        log.info("%s call %s: DTMF %s", self.transport, self.call_id, digit)
        self.conversation.push_dtmf(digit)

    def bad_input(self, what: str) -> None:
        """A message the wire's parser refused: logged (the first few, then every 100th), counted, ignored."""
        self.bad_messages += 1
        if self.bad_messages <= _BAD_LOGGED or self.bad_messages % 100 == 0:
            log.warning("%s call %s: ignored a bad message from the client (%d so far): %s",
                        self.transport, self.call_id, self.bad_messages, what)

    # ------------------------------------------------------------ the conversation's events
    def _safe_listener(self, event: Event) -> None:
        try:
            self.listener(event)
        except Exception:
            log.exception("%s call %s: observer failed on %s", self.transport, self.call_id, type(event).__name__)

    def _on_event(self, event: Event) -> None:
        self.send_event(event_to_dict(event))
        if isinstance(event, HangupRequested) and self._hangup is None:
            reason = event.reason
            self._hangup = f"agent_hangup: {reason}" if reason in (INACTIVITY, MAX_DURATION, DRAIN) else "agent_hangup"
        elif isinstance(event, TurnFinished | TurnFailed) and event.ledger is not None and self.marks:
            if event.turn in self._heard_at:
                self._record_heard(event.turn, event.ledger)
            else:
                self._ledgers[event.turn] = event.ledger
                while len(self._ledgers) > _KEEP_TURNS:
                    del self._ledgers[min(self._ledgers)]

    def _record_heard(self, turn: int, ledger: TurnLedger) -> None:
        """The turn's first frame was confirmed: its outbound part and first_audio_heard; TurnHeard after."""
        out = ledger.marks.get("first_audio_out")
        heard = self._heard_at.get(turn)
        if out is None or heard is None or turn in self._reported:
            return
        self._reported.add(turn)
        try:
            ledger.record_transport("playout", max(0.0, (heard - out - TICK_S) * 1000.0))
        except ValueError:
            log.warning("%s call %s turn %d: mark came back %.1f s after the first frame; not recorded",
                        self.transport, self.call_id, turn, heard - out)
            return
        ledger.notes["heard_by"] = "mark"
        ledger.record_heard()
        heard_event = TurnHeard(turn, ledger)
        # after the TurnFinished that may be on its way to the other listeners right now
        asyncio.get_running_loop().call_soon(self._emit_heard, heard_event)

    def _emit_heard(self, event: TurnHeard) -> None:
        if self.close_reason is None:
            self.send_event(event_to_dict(event))
            self._safe_listener(event)

    # ------------------------------------------------------------ to the client
    def _queue(self, kind: str, message: str | bytes) -> None:
        if self._closing is not None:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self.end("client not reading")
            return
        self._outbox.append((kind, message))
        self._wake.set()

    def _on_unsent(self, samples: int) -> None:
        """The playout took back unconfirmed audio (barge-in, flush): drop what is not written yet, clear."""
        self._outbox = deque(item for item in self._outbox if item[0] != "audio")
        self._buffer_end = self.clock()
        for message in self.wire.clear():
            self._queue("control", message)
        log.debug("%s call %s: %d ms of sent audio taken back; clear", self.transport, self.call_id,
                  samples * 1000 // self.wire_rate)

    async def _write(self) -> None:
        sends: dict[type, Callable[[Any], Awaitable[None]]] = {str: self.socket.send_str, bytes: self.socket.send_bytes}
        while True:
            while self._outbox:
                _kind, message = self._outbox.popleft()
                try:
                    await asyncio.wait_for(sends[type(message)](message), SEND_TIMEOUT_S)
                except TimeoutError:
                    self.end("client not reading")
                    return
                except (ConnectionError, RuntimeError) as error:   # closed under us (aiohttp: RuntimeError)
                    self.end(f"connection lost: {type(error).__name__}")
                    return
            self._wake.clear()
            await self._wake.wait()

    # ------------------------------------------------------------ the clock
    async def _run(self) -> None:
        reason = await Pacer(TICK_S, self.clock).run(self._tick)
        self._stop = self._stop or reason
        self.ended.set()

    @property
    def stop_reason(self) -> str | None:
        return self._stop

    def _tick(self, deadline: float) -> str | None:
        if self._stop is not None:
            return self._stop
        now = self.clock()
        if now - self._last_message >= NO_MEDIA_TIMEOUT_S:
            log.info("%s call %s: nothing from the client for %.1f s", self.transport, self.call_id,
                     now - self._last_message)
            return VANISHED
        gap = now - self._last_fed
        if gap >= SILENCE_AFTER_S:   # the client's audio stopped: the missed time is silence
            silence = np.zeros(SAMPLE_RATE * 20 // 1000, np.int16)
            for _ in range(int(gap / TICK_S)):
                self._last_fed += TICK_S
                self.conversation.push_frame(AudioFrame(silence, self._last_fed))
        self._send_ahead(now)
        return self._hangup_due(now)

    def _send_ahead(self, now: float) -> None:
        if self._buffer_end < now:
            self._buffer_end = now    # the far end's buffer ran dry
        while self._buffer_end - now < self.lead_s - 1e-6:
            pcm = self.playout.pull(self.frame)
            if pcm is None:
                return
            seq = self.playout.last_seq
            for message in self.wire.audio(pcm, seq):
                self._queue("audio", message)
            if not self.marks:
                self.playout.confirm(seq)
            self._buffer_end += TICK_S
            self._last_sent = now

    def _hangup_due(self, now: float) -> str | None:
        if self._hangup is None or not self.playout.idle:
            self._hangup_since = None
            return None
        if self._hangup_since is None:
            self._hangup_since = now
        if self.marks:
            if self.playout.unconfirmed_samples == 0 or now - self._hangup_since >= MARKS_WAIT_S:
                return self._hangup
            return None
        return self._hangup if now - max(self._last_sent, self._hangup_since) >= HANGUP_GRACE_S else None
