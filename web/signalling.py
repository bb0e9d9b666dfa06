"""WebRTC signalling: `POST /offer` admits a browser caller, `GET /webrtc/config` tells the page how.

The offer is checked before any peer connection exists, so bad input costs
nothing and gets a 4xx that says what is wrong: not JSON (400), not an
object with an SDP offer (400), no audio in it (400), too big (413).  Beyond
`webrtc.max_calls` callers get 503 with Retry-After.  aiortc's own parse
errors on a well-formed-looking SDP are 400 too; anything else is our bug
(500), and the server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError

from sub300.agent.calls import CallObserver
from sub300.agent.config import Config
from sub300.agent.engines import Engines
from sub300.media.webrtc.call import WebRtcCall
from sub300.media.webrtc.ice import allow_loopback_when_alone, ice_servers, rtc_configuration

log = logging.getLogger(__name__)
#: a browser's audio+data offer is 3–6 kB; this leaves room for many candidates
MAX_OFFER_BYTES = 64 * 1024


#: what aiortc raises for an offer it cannot parse or negotiate (no common codec, no ICE credentials, …)
_OFFER_ERRORS = (ValueError, TypeError, KeyError, IndexError,
                 InternalError, InvalidAccessError, InvalidStateError, OperationError)


class BadOffer(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def parse_offer(raw: bytes) -> RTCSessionDescription:
    if len(raw) > MAX_OFFER_BYTES:
        raise BadOffer(413, f"offer too large ({len(raw)} bytes; at most {MAX_OFFER_BYTES})")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadOffer(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadOffer(400, 'body must be a JSON object {"sdp": ..., "type": "offer"}')
    sdp, kind = body.get("sdp"), body.get("type")
    if kind != "offer":
        raise BadOffer(400, f'"type" must be "offer", got {kind!r}')
    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        raise BadOffer(400, '"sdp" must be an SDP session description (starting with "v=0")')
    media = [line.split()[0][2:] for line in sdp.splitlines() if line.startswith("m=") and line.split()]
    if "audio" not in media:
        raise BadOffer(400, f"the offer has no audio section (media: {media or 'none'}); "
                            "the caller must send a microphone track")
    return RTCSessionDescription(sdp=sdp, type="offer")


class Signalling:
    """The live browser calls of one app, and the routes that create them."""

    def __init__(self, config: Config, engines: Engines, observer: CallObserver) -> None:
        self.config = config
        self.engines = engines
        self.observer = observer
        self.calls: dict[str, WebRtcCall] = {}
        self._pending = 0   # offers being answered: they count against max_calls too
        allow_loopback_when_alone()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/offer", self.offer)
        app.router.add_get("/webrtc/config", self.page_config)
        app.on_shutdown.append(self._on_shutdown)

    async def page_config(self, request: web.Request) -> web.Response:
        return web.json_response({
            "iceServers": ice_servers(self.config.webrtc),
            "budget_ms": self.config.budget_ms,
            "engines": self.engines.describe(),
        })

    async def offer(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return _error(413, f"offer too large ({request.content_length} bytes; at most {MAX_OFFER_BYTES})")
        try:
            raw = await request.content.read(MAX_OFFER_BYTES + 1)
            offer = parse_offer(raw)
        except BadOffer as bad:
            return _error(bad.status, str(bad))
        if len(self.calls) + self._pending >= self.config.webrtc.max_calls:
            return _error(503, f"busy: {self.config.webrtc.max_calls} calls in progress, try again later",
                          **{"Retry-After": "5"})
        self._pending += 1
        try:
            return await self._answer(offer)
        finally:
            self._pending -= 1

    async def _answer(self, offer: RTCSessionDescription) -> web.Response:
        call_id = uuid.uuid4().hex[:12]
        pc = RTCPeerConnection(rtc_configuration(self.config.webrtc))
        call = WebRtcCall(call_id, pc, self.engines, self.config, self.observer, on_closed=self._forget)
        self.calls[call_id] = call
        try:
            answer = await call.accept(offer)
        except asyncio.CancelledError:  # the client went away while we answered
            await call.close("signalling cancelled")
            raise
        except _OFFER_ERRORS as exc:  # aiortc's SDP parser and negotiation refused it
            await call.close("bad offer")
            return _error(400, f"cannot use this offer: {exc}")
        except Exception as exc:
            log.exception("answering offer for call %s failed", call_id)
            await call.close("error")
            return _error(500, f"internal error while answering: {exc!r}")
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "call_id": call_id})

    def _forget(self, call: WebRtcCall) -> None:
        self.calls.pop(call.call_id, None)

    async def close_all(self, reason: str = "shutdown") -> None:
        await asyncio.gather(*(call.close(reason) for call in list(self.calls.values())), return_exceptions=True)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close_all()


def describe_calls(signalling: Signalling) -> list[dict[str, Any]]:
    return [{"call_id": c.call_id, "state": c.conversation.state.value, "connection": c.pc.connectionState}
            for c in signalling.calls.values()]
