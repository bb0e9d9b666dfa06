"""WebSocket media routes: ``/ws/twilio`` (Twilio Media Streams and its kin) and ``/ws/pcm`` (custom clients).

Each WebSocket is one call (media/websocket/call.py) on the app's engines,
admission, call observer (metrics with transport "twilio" | "pcm", records
and usage, traces: the observer `Signalling` holds, so whatever
``sub300 serve`` adds to it) and behaviour (``BEHAVIOUR_KEY``), with the
call limits of ``[call]`` and the drain (`WebSocketCalls`, a drain
`CallSet` at ``app[WS_CALLS_KEY]``).

Authentication (web/auth.py covers ``/ws…`` with the scope "calls"): a
call token in the query string (``?token=``) or an ``Authorization``
header, checked before the upgrade (401 otherwise).  Twilio's ``<Stream
url>`` takes no query string, so ``/ws/twilio`` also accepts the upgrade
without a credential and reads the token from the ``start`` event's
``customParameters.token`` (TwiML ``<Parameter name="token" value="…"/>``),
checked with the same code (`Authenticator`, agent/auth/tokens.py) before
the call is admitted; a missing or bad one closes the socket with 1008
(policy violation) and its reason.  With authentication off nothing is
needed (a valid token still names its key, for records and usage).

Closing codes (RFC 6455 §7.4.1; 1013 "Try Again Later" from the IANA
registry): 1000 the call ended (the reason says why: ``agent_hangup``,
``stop``, ``hangup``, ``caller vanished``, …); 1001 the server shuts down;
1008 refused (authentication; a bad ``rate``; no ``start`` within
`START_TIMEOUT_S`; a ``start`` that is not μ-law 8 kHz mono); 1013 not
admitted (draining, full, saturated: agent/admission.py's message).
Messages are at most `MAX_MESSAGE_BYTES` (a larger one: 1009, "message too big"); aiohttp pings every
`HEARTBEAT_S` and closes a socket that does not answer (a client gone
without a close frame), besides the call's own no-media watchdog.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from sub300.agent.admission import Admission, Refusal, Ticket
from sub300.agent.auth.authenticator import AuthFailed, Principal
from sub300.agent.auth.limits import CallSlot
from sub300.agent.auth.tokens import looks_like_jwt
from sub300.agent.behaviour import Behaviour
from sub300.agent.calls import CallContext
from sub300.agent.config import Config
from sub300.agent.engines import Engines
from sub300.media.sip import g711
from sub300.media.websocket import pcm, twilio
from sub300.media.websocket.call import TICK_S, WebSocketCall

from .auth import AUTH_KEY, CALL_SLOT, PRINCIPAL
from .signalling import Signalling

log = logging.getLogger(__name__)
#: how far ahead of the caller's ear Twilio gets our audio (media/websocket/call.py): 5 frames
TWILIO_LEAD_S = 0.100
#: PCM clients get real time: one frame, no marks
PCM_LEAD_S = TICK_S
#: the ``start`` event must come this soon after the upgrade
START_TIMEOUT_S = 10.0
#: one message at most (bytes): 1 s of 48 kHz 16-bit PCM (96 000) fits; larger closes with 1009 (RFC 6455 §7.4.1)
MAX_MESSAGE_BYTES = 128 * 1024
HEARTBEAT_S = 10.0
TRY_AGAIN_LATER = 1013
_REASON_BYTES = 120   # a close reason is at most 123 bytes (RFC 6455 §5.5)


class WebSocketCalls:
    """The live WebSocket calls of one app; the drain's `CallSet` (sub300/drain.py) for both routes."""

    name = "WebSocket"

    def __init__(self) -> None:
        self.calls: dict[str, tuple[WebSocketCall, web.WebSocketResponse]] = {}

    def active_calls(self) -> int:
        return len(self.calls)

    def describe(self) -> list[dict[str, str]]:
        """For /healthz: each call's id, transport (twilio | pcm) and turn state."""
        return [{"call_id": call.call_id, "transport": call.transport, "state": call.conversation.state.value}
                for call, _ws in self.calls.values()]

    def end_politely(self, goodbye: str) -> None:
        for call, _ws in list(self.calls.values()):
            call.end_politely(goodbye)

    async def end_now(self, reason: str) -> None:
        """End every call at once: socket closed with 1001, call closed (observer told)."""
        entries = list(self.calls.values())
        for call, _ws in entries:
            call.end(reason)
        results = await asyncio.gather(*(self._end(call, ws, reason) for call, ws in entries), return_exceptions=True)
        for (call, _ws), result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                log.error("closing %s call %s failed: %r", call.transport, call.call_id, result, exc_info=result)

    @staticmethod
    async def _end(call: WebSocketCall, ws: web.WebSocketResponse, reason: str) -> None:
        await call.close(reason)
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


WS_CALLS_KEY = web.AppKey("ws_calls", WebSocketCalls)


class _Routes:
    def __init__(self, config: Config, engines: Engines, signalling: Signalling, admission: Admission,
                 behaviour: Behaviour, registry: WebSocketCalls) -> None:
        self.config = config
        self.engines = engines
        self.signalling = signalling   # its observer: metrics, and what `sub300 serve` adds (records, traces)
        self.admission = admission
        self.behaviour = behaviour
        self.registry = registry
        self._tickets: dict[str, Ticket] = {}       # call id → its admission slot, released with the call
        self._slots: dict[str, CallSlot] = {}       # call id → its calls-at-once slot (web/auth.py)

    # ------------------------------------------------------------ the routes
    async def twilio_route(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        try:
            start = await asyncio.wait_for(self._twilio_start(ws), START_TIMEOUT_S)
        except TimeoutError:
            return await _refuse(ws, WSCloseCode.POLICY_VIOLATION, f"no start event within {START_TIMEOUT_S:g} s")
        except twilio.ProtocolError as bad:
            return await _refuse(ws, WSCloseCode.POLICY_VIOLATION, str(bad))
        if start is None:   # the client left before its start
            return ws
        principal = await self._principal(request, start.custom_parameters.get("token"))
        if isinstance(principal, str):
            return await _refuse(ws, WSCloseCode.POLICY_VIOLATION, principal)
        stream_sid = start.stream_sid
        wire = _TwilioWire(stream_sid)
        log.info("twilio stream %s (call %s) started", stream_sid, start.call_sid or "?")
        await self._serve(request, ws, "twilio", wire, principal, twilio.RATE, TWILIO_LEAD_S, True,
                          lambda call, message: _on_twilio(call, message))
        return ws

    async def pcm_route(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        try:
            rate = pcm.parse_rate(request.query.get("rate"))
        except pcm.BadRate as bad:
            return await _refuse(ws, WSCloseCode.POLICY_VIOLATION, str(bad))
        principal = request.get(PRINCIPAL) or Principal(None, frozenset(), request.remote or "unknown", "open")
        await self._serve(request, ws, "pcm", _PcmWire(), principal, rate, PCM_LEAD_S, False,
                          lambda call, message: _on_pcm(call, message, rate))
        return ws

    # ------------------------------------------------------------ one call
    async def _serve(self, request: web.Request, ws: web.WebSocketResponse, transport: str, wire,
                     principal: Principal, rate: int, lead_s: float, marks: bool,
                     on_message: Callable[[WebSocketCall, WSMessage], None]) -> None:
        ticket = self.admission.try_admit(transport)
        if isinstance(ticket, Refusal):
            await _refuse(ws, TRY_AGAIN_LATER, f"{ticket.reason}: {ticket.message}")
            return
        call_id = uuid.uuid4().hex[:12]
        context = CallContext(key_id=principal.key_id, source=principal.source,
                              record_audio=principal.record_audio or self.config.records.record_audio)
        try:
            call = WebSocketCall(call_id, transport, wire, ws, self.engines, self.config, self.signalling.observer,
                                 wire_rate=rate, lead_s=lead_s, marks=marks, context=context,
                                 clock=asyncio.get_running_loop().time,   # monotonic; virtual under looptime
                                 behaviour=self.behaviour, on_closed=self._forget)
        except Exception:
            ticket.release()
            log.exception("%s call %s: could not be set up", transport, call_id)
            await _refuse(ws, WSCloseCode.INTERNAL_ERROR, "internal error (see the server log)")
            return
        self.registry.calls[call_id] = (call, ws)
        self._tickets[call_id] = ticket
        slot = request.pop(CALL_SLOT, None)   # web/auth.py's calls-at-once slot: released with the call
        if slot is not None:
            self._slots[call_id] = slot
        reason = "caller closed"
        try:
            call.send_event({"kind": "hello", "call_id": call_id, "rate": rate, "budget_ms": self.config.budget_ms})
            call.start()
            reason = await self._pump(ws, call, on_message)
        except asyncio.CancelledError:   # aiohttp cancels a handler whose client connection was lost
            reason = "connection lost"
            raise
        except Exception as error:
            log.exception("%s call %s: failed", transport, call_id)
            reason = f"error: {error!r}"
        finally:
            reason = call.stop_reason or reason
            await call.close(reason)
            if not ws.closed:
                code = WSCloseCode.GOING_AWAY if "drain" in reason or reason == "shutdown" else WSCloseCode.OK
                await ws.close(code=code, message=reason.encode()[:_REASON_BYTES])

    async def _pump(self, ws: web.WebSocketResponse, call: WebSocketCall,
                    on_message: Callable[[WebSocketCall, WSMessage], None]) -> str:
        """Read the client's messages into the call until either side ends; the reason."""
        receive: asyncio.Task | None = None
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait((receive, ended), return_when=asyncio.FIRST_COMPLETED)
                if ended.done():
                    return call.stop_reason or "ended"
                message = receive.result()
                receive = None
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    return "caller closed"
                if message.type == WSMsgType.ERROR:
                    log.info("%s call %s: connection lost: %r", call.transport, call.call_id, ws.exception())
                    return "connection lost"
                call.heard_from()
                on_message(call, message)
        finally:
            for task in (receive, ended):
                if task is not None and not task.done():
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, Exception):
                        pass

    def _forget(self, call: WebSocketCall) -> None:
        self.registry.calls.pop(call.call_id, None)
        ticket = self._tickets.pop(call.call_id, None)
        if ticket is not None:
            ticket.release()
        slot = self._slots.pop(call.call_id, None)
        if slot is not None:
            slot.release()

    # ------------------------------------------------------------ Twilio's start, and its token
    async def _twilio_start(self, ws: web.WebSocketResponse) -> twilio.Start | None:
        """Read until the ``start`` event (``connected`` first); None if the client leaves before it."""
        while True:
            message = await ws.receive()
            if message.type != WSMsgType.TEXT:
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return None
                log.info("twilio stream: a binary message before start was ignored")
                continue
            try:
                event = twilio.parse(message.data)
            except twilio.ProtocolError as bad:
                if "mediaFormat" in str(bad):
                    raise
                log.info("twilio stream: a bad message before start was ignored: %s", bad)
                continue
            if isinstance(event, twilio.Start):
                return event
            if not isinstance(event, twilio.Connected):
                log.info("twilio stream: a %s message before start was ignored", type(event).__name__.lower())

    async def _principal(self, request: web.Request, token: str | None) -> Principal | str:
        """Who the stream is: the middleware's principal, or (no credential on the upgrade) the ``start`` event's
        token; a string says why the stream is refused."""
        principal = request.get(PRINCIPAL)
        state = request.app.get(AUTH_KEY)
        source = principal.source if principal is not None else (request.remote or "unknown")
        if principal is None or state is None:   # an app without authentication
            return principal or Principal(None, frozenset(), source, "open")
        deferred = principal.via == "deferred"
        if not token:
            return "authentication required: a call token in customParameters.token" if deferred else principal
        if not deferred and principal.key_id is not None:
            return principal   # the upgrade was authenticated already
        if not looks_like_jwt(token):   # Twilio shows the parameters in its console and logs: no API key there
            return "only a call token may ride in customParameters.token (mint one with POST /v1/call-tokens)"
        try:
            known = await state.authenticator.authenticate(token, source)
        except AuthFailed as error:
            if deferred:
                log.info("twilio stream from %s refused: %s", source, error)
                return str(error)[:_REASON_BYTES]
            log.info("authentication off: the stream's token was ignored (%s)", error)
            return principal
        if deferred and "calls" not in known.scopes:
            return "this credential lacks the 'calls' scope"
        return Principal(known.key_id, principal.scopes | known.scopes, source, known.via, known.record_audio)


class _TwilioWire:
    """Twilio's format of our side: a ``media`` then a ``mark`` named by its frame number; ``clear``; no events."""

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid

    def audio(self, samples, seq: int) -> list[str | bytes]:
        return [twilio.media_message(self.stream_sid, g711.encode("PCMU", samples)),
                twilio.mark_message(self.stream_sid, str(seq))]

    def clear(self) -> list[str | bytes]:
        return [twilio.clear_message(self.stream_sid)]

    def event(self, payload) -> list[str | bytes]:
        return []   # Twilio takes no other message


class _PcmWire:
    """PCM's format: a binary frame per 20 ms; JSON text for events and ``clear``."""

    def audio(self, samples, seq: int) -> list[str | bytes]:
        return [pcm.encode_frame(samples)]

    def clear(self) -> list[str | bytes]:
        return [pcm.clear_message()]

    def event(self, payload) -> list[str | bytes]:
        return [pcm.event_message(payload)]


def _on_twilio(call: WebSocketCall, message: WSMessage) -> None:
    if message.type != WSMsgType.TEXT:
        call.bad_input(f"a {message.type.name} message (Twilio sends JSON text)")
        return
    try:
        event = twilio.parse(message.data)
    except twilio.ProtocolError as bad:
        call.bad_input(str(bad))
        return
    if isinstance(event, twilio.Media):
        if event.track == "inbound":
            call.caller_audio(g711.decode("PCMU", event.payload))
    elif isinstance(event, twilio.Mark):
        if event.name.isdigit():
            call.mark_played(int(event.name))
        else:
            call.bad_input(f"a mark we did not send: {event.name[:32]!r}")
    elif isinstance(event, twilio.Dtmf):
        call.dtmf(event.digit)
    elif isinstance(event, twilio.Stop):
        call.end("stop")
    elif isinstance(event, twilio.Start):
        call.bad_input("a second start event")


def _on_pcm(call: WebSocketCall, message: WSMessage, rate: int) -> None:
    try:
        if message.type == WSMsgType.BINARY:
            call.caller_audio(pcm.decode_frame(message.data, rate))
        elif message.type == WSMsgType.TEXT:
            data = pcm.parse_text(message.data)
            if data["type"] == "hangup":
                call.end("hangup")
            else:
                call.dtmf(data["digit"])
    except pcm.ProtocolError as bad:
        call.bad_input(str(bad))


async def _refuse(ws: web.WebSocketResponse, code: int, reason: str) -> web.WebSocketResponse:
    log.info("WebSocket stream refused (%d): %s", code, reason)
    await ws.close(code=code, message=reason.encode()[:_REASON_BYTES])
    return ws


def add_websocket_routes(app: web.Application, config: Config, engines: Engines, signalling: Signalling,
                         admission: Admission, behaviour: Behaviour) -> WebSocketCalls:
    """Mount ``/ws/twilio`` and ``/ws/pcm``; ``app[WS_CALLS_KEY]`` holds their calls (for the drain); every call
    left is ended when the app shuts down."""
    registry = WebSocketCalls()
    routes = _Routes(config, engines, signalling, admission, behaviour, registry)
    app[WS_CALLS_KEY] = registry
    app.router.add_get("/ws/twilio", routes.twilio_route)
    app.router.add_get("/ws/pcm", routes.pcm_route)

    async def close_all(app: web.Application) -> None:
        if registry.calls:
            await registry.end_now("shutdown")

    app.on_shutdown.append(close_all)
    return registry
