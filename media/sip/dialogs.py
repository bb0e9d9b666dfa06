"""The SIP user agent server: RFC 3261 transactions and dialogs, as gateways exercise them.

New INVITE: checks (hops, source allow-list, digest, Require, call limit,
SDP → 488) → 100 Trying → 180 Ringing → 200 OK with the SDP answer,
retransmitted until the ACK (§13.3.1.4) and answered again when the INVITE
itself is retransmitted.  In the dialog: ACK, BYE (either side), re-INVITE
(new address, codec or hold), INFO (DTMF), OPTIONS.  CANCEL while ringing →
200 for the CANCEL and 487 for the INVITE.  Responses to non-INVITE
requests are kept 32 s so retransmissions get the same answer.

Routing: responses go to the top Via's source (with `received`/`rport`,
RFC 3581); our BYE follows the route set learnt from Record-Route (loose
routing) or goes to the caller's Contact — through Kamailio when it
record-routes.

Tasks: each call has a set-up task (answer, possibly after a ring delay)
and a media task (`SipCall.run`); each retransmission loop is a task; all
live in `self._tasks` and `close()` cancels and awaits them.  No exception
from a message escapes `handle`: a bug in one request answers 500, it does
not stop the server.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from sipmessage import Address, URI

from sub300.agent.calls import CallObserver
from sub300.agent.config import Config
from sub300.agent.engines import Engines

from . import message as sip
from .auth import DigestAuth, SourceFilter
from .call import SipCall
from .dtmf import digit_from_info
from .rtp import PortAllocator, RtpEndpoint
from .sdp import AudioParams, LocalDescription, NoCommonCodec, SdpError, negotiate, parse as parse_sdp
from .transport import Flow

log = logging.getLogger(__name__)
T1, T2 = 0.5, 4.0
TIMER_B = 64 * T1            # give up waiting for an ACK or a response after this
_IN_DIALOG = {"ACK", "BYE", "INFO", "OPTIONS", "INVITE"}
_NOT_ALLOWED = {"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "UPDATE", "PRACK"}


@dataclass
class _InviteTx:
    """An INVITE server transaction: what to resend when the INVITE comes again, and whether it was ACKed."""

    request: sip.Request
    flow: Flow
    destination: tuple[str, int]
    last_response: bytes | None = None
    final: int | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float = 0.0


@dataclass
class _Dialog:
    invite: sip.Request
    tx: _InviteTx
    local_tag: str
    remote_target: str
    route_set: list[str]
    local_sdp: LocalDescription
    params: AudioParams | None
    offerless: bool
    remote_cseq: int
    sock: socket.socket | None = None          # the RTP socket, until an endpoint owns it
    local_cseq: int = 1
    call: SipCall | None = None
    setup_task: asyncio.Task | None = None
    run_task: asyncio.Task | None = None
    pending_ack: asyncio.Event | None = None   # a 2xx (INVITE or re-INVITE) waiting for its ACK
    observed: bool = False
    ended: bool = False

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    @property
    def key(self) -> tuple[str, str]:
        return self.invite.call_id, self.local_tag


def _local_ip_for(host: str) -> str:
    """The address of ours that packets to `host` leave from (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class UserAgentServer:
    def __init__(self, config: Config, engines: Engines, observer: CallObserver,
                 send_udp: Callable[[bytes, tuple[str, int]], None], *, local_port: int,
                 auth: DigestAuth | None = None, answer_delay_s: float = 0.0, clock=time.monotonic):
        self.config, self.engines, self.observer = config, engines, observer
        self.sip = config.sip
        self.send_udp = send_udp
        self.local_port = local_port
        self.sources = SourceFilter(self.sip.allowed_sources)
        self.auth = auth
        self.answer_delay_s = answer_delay_s
        self.clock = clock
        self.ports = PortAllocator(self.sip.rtp_port_min, self.sip.rtp_port_max)
        self.dialogs: dict[tuple[str, str], _Dialog] = {}
        self._invites: dict[str, _InviteTx] = {}
        self._answered: dict[tuple[str, str], tuple[bytes, Flow, tuple[str, int], float]] = {}
        self._client: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        self.malformed = 0
        #: the last calls' outcomes (call id, reason, RTP counters, digits): for logs, admin pages and tests
        self.ended_calls: deque[dict] = deque(maxlen=100)

    # ------------------------------------------------------------ entry
    def handle(self, data: bytes, flow: Flow) -> None:
        """One message from the network.  Never raises."""
        try:
            self._prune()
            try:
                parsed = sip.parse(data)
            except (ValueError, KeyError, IndexError, TypeError) as error:
                self._malformed(data, flow, str(error) or type(error).__name__)
                return
            if not hasattr(parsed, "method"):
                self._on_response(parsed)
                return
            try:
                request = sip.check_request(parsed)
            except (ValueError, KeyError) as error:
                self._malformed(data, flow, str(error) or type(error).__name__)
                return
            self._dispatch(request, flow)
        except Exception:
            log.exception("SIP message from %s:%d crashed its handler", *flow.source)
            salvage = sip.salvage_for_400(data, flow.source, "x")
            if salvage is not None:   # the request is readable: tell the sender we failed, not that it did
                flow.send(salvage[0].replace(b" 400 x\r\n", b" 500 Server Internal Error\r\n", 1), salvage[1])

    def _malformed(self, data: bytes, flow: Flow, reason: str) -> None:
        self.malformed += 1
        log.info("malformed SIP from %s:%d: %s", *flow.source, reason)
        salvage = sip.salvage_for_400(data, flow.source, f"Bad Request ({reason})")
        if salvage is not None:
            flow.send(*salvage)

    def _own(self, coro, name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    def _prune(self) -> None:
        now = self.clock()
        for branch in [b for b, tx in self._invites.items() if tx.expires and tx.expires < now]:
            del self._invites[branch]
        for key in [k for k, v in self._answered.items() if v[3] < now]:
            del self._answered[key]

    # ------------------------------------------------------------ replies
    def _destination(self, request: sip.Request, flow: Flow) -> tuple[str, int]:
        return sip.response_destination(request, flow.source) if flow.transport == "UDP" else flow.source

    def _reply(self, request: sip.Request, flow: Flow, status: int, **kw) -> bytes:
        data = sip.response(request, flow.source, status, **kw)
        destination = self._destination(request, flow)
        flow.send(data, destination)
        if request.method not in ("INVITE", "ACK") and status >= 200:
            self._answered[(request.branch, request.method)] = (data, flow, destination, self.clock() + TIMER_B)
        return data

    def _reject_invite(self, tx: _InviteTx, status: int, headers: list[tuple[str, str]] = (), to_tag: str | None = None) -> None:
        data = sip.response(tx.request, tx.flow.source, status, to_tag=to_tag or sip.new_tag(), headers=headers)
        tx.last_response, tx.final = data, status
        tx.expires = self.clock() + TIMER_B
        tx.flow.send(data, tx.destination)
        if tx.flow.transport == "UDP":   # timer G: resend until the ACK
            self._own(self._retransmit(lambda: tx.flow.send(data, tx.destination), tx.acked), "sip-retransmit-final")

    async def _retransmit(self, send: Callable[[], None], done: asyncio.Event, on_timeout: Callable[[], None] | None = None) -> None:
        interval, deadline = T1, self.clock() + TIMER_B
        while self.clock() < deadline:
            try:
                await asyncio.wait_for(done.wait(), timeout=min(interval, max(0.0, deadline - self.clock())))
                return
            except asyncio.TimeoutError:
                pass
            if self.clock() >= deadline:
                break
            send()
            interval = min(interval * 2, T2)
        if on_timeout is not None and not done.is_set():
            on_timeout()

    # ------------------------------------------------------------ dispatch
    def _dispatch(self, request: sip.Request, flow: Flow) -> None:
        method = request.method
        if method not in ("INVITE", "ACK"):
            cached = self._answered.get((request.branch, method))
            if cached is not None:   # a retransmitted request: the same answer again
                cached[1].send(cached[0], cached[2])
                return
        if method == "CANCEL":
            self._on_cancel(request, flow)
            return
        if request.to_tag is not None:
            self._in_dialog(request, flow)
            return
        if method == "INVITE":
            self._on_invite(request, flow)
        elif method == "ACK":
            tx = self._invites.get(request.branch)
            if tx is not None:
                tx.acked.set()   # ACK of our error response
        elif method == "OPTIONS":
            self._reply(request, flow, 200, headers=self._capabilities())
        elif method in ("BYE", "INFO"):
            self._reply(request, flow, 481)
        elif method in _NOT_ALLOWED:
            self._reply(request, flow, 405, headers=[("Allow", sip.ALLOW)])
        else:
            self._reply(request, flow, 501, headers=[("Allow", sip.ALLOW)])

    @staticmethod
    def _capabilities() -> list[tuple[str, str]]:
        return [("Allow", sip.ALLOW), ("Accept", "application/sdp"), ("Supported", ""), ("Accept-Language", "en")]

    # ------------------------------------------------------------ new calls
    def _on_invite(self, request: sip.Request, flow: Flow) -> None:
        tx = self._invites.get(request.branch)
        if tx is not None:   # retransmitted INVITE: repeat the last answer
            if tx.last_response is not None:
                tx.flow.send(tx.last_response, tx.destination)
            return
        tx = _InviteTx(request, flow, self._destination(request, flow))
        self._invites[request.branch] = tx
        max_forwards = request.header("Max-Forwards")
        if max_forwards is not None and max_forwards.strip() == "0":
            return self._reject_invite(tx, 483)
        if not self.sources.allows(flow.source[0]):
            log.warning("INVITE from %s refused: not in sip.allowed_sources", flow.source[0])
            return self._reject_invite(tx, 403)
        if self.auth is not None:
            verdict = self.auth.check(request.header("Authorization"), "INVITE")
            if verdict in ("missing", "stale"):
                return self._reject_invite(tx, 401, [("WWW-Authenticate", self.auth.challenge(stale=verdict == "stale"))])
            if verdict != "ok":
                log.warning("INVITE from %s refused: bad credentials", flow.source[0])
                return self._reject_invite(tx, 403)
        required = [r.strip() for h in request.headers("Require") for r in h.split(",") if r.strip()]
        if required:
            return self._reject_invite(tx, 420, [("Unsupported", ", ".join(required))])
        if sum(not d.ended for d in self.dialogs.values()) >= self.sip.max_calls:
            log.warning("INVITE from %s refused: %d calls already (sip.max_calls)", flow.source[0], self.sip.max_calls)
            return self._reject_invite(tx, 503, [("Retry-After", "5")])
        contact = request.header("Contact")
        try:
            target = str(Address.parse_many(contact)[0].uri) if contact else ""
        except ValueError:
            target = ""
        if not target:
            return self._reject_invite(tx, 400)
        offer, params, index = None, None, 0
        if request.body:
            try:
                offer = parse_sdp(request.body)
                index, params = negotiate(offer, self.sip.codecs)
            except NoCommonCodec as error:
                log.info("INVITE from %s: %s", flow.source[0], error)
                return self._reject_invite(tx, 488, [("Warning", '305 sub300 "Incompatible media format"')])
            except SdpError as error:
                log.info("INVITE from %s: bad SDP: %s", flow.source[0], error)
                return self._reject_invite(tx, 400)
        try:
            sock = self.ports.bind(self.sip.host)
        except OSError as error:
            log.error("no RTP port for a call: %s", error)
            return self._reject_invite(tx, 503, [("Retry-After", "5")])
        tx.last_response = sip.response(request, flow.source, 100)
        flow.send(tx.last_response, tx.destination)
        routes = [str(a) for h in request.headers("Record-Route") for a in Address.parse_many(h)]
        public = self.sip.public_address or (self.sip.host if self.sip.host not in ("0.0.0.0", "::") else _local_ip_for(flow.source[0]))
        dialog = _Dialog(request, tx, sip.new_tag(), target, routes, LocalDescription(public, sock.getsockname()[1]),
                         params, offerless=offer is None, remote_cseq=request.cseq, sock=sock)
        self.dialogs[dialog.key] = dialog
        ringing = sip.response(request, flow.source, 180, to_tag=dialog.local_tag, record_route=True,
                               headers=[("Contact", self._contact(public, flow))])
        tx.last_response = ringing
        flow.send(ringing, tx.destination)
        dialog.setup_task = self._own(self._answer(dialog, offer, index, sock, public, flow), f"sip-answer-{request.call_id}")

    def _contact(self, public: str, flow: Flow) -> str:
        host = f"[{public}]" if ":" in public else public
        return f"<sip:sub300@{host}:{self.local_port};transport={flow.transport.lower()}>"

    async def _answer(self, dialog: _Dialog, offer, index: int, sock: socket.socket, public: str, flow: Flow) -> None:
        endpoint = None
        try:
            if self.answer_delay_s:
                await asyncio.sleep(self.answer_delay_s)
            params = dialog.params or AudioParams("0.0.0.0", 0, self.sip.codecs[0],
                                                  {"PCMU": 0, "PCMA": 8}[self.sip.codecs[0]], None, "sendrecv")
            call = SipCall(dialog.call_id, self.engines, self.config, listener=lambda event: None, clock=self.clock)
            endpoint = RtpEndpoint(params, call.on_audio, call.on_dtmf, clock=self.clock)
            await endpoint.open(sock)
            call.endpoint = endpoint
            dialog.call = call
        except BaseException:
            if endpoint is not None:
                endpoint.close()
            else:
                sock.close()
            raise
        body = dialog.local_sdp.offer(self.sip.codecs) if offer is None else dialog.local_sdp.answer(offer, index, params)
        ok = sip.response(dialog.invite, flow.source, 200, to_tag=dialog.local_tag, record_route=True, body=body,
                          headers=[("Contact", self._contact(public, flow)), *self._capabilities()])
        dialog.tx.last_response, dialog.tx.final = ok, 200
        dialog.tx.expires = self.clock() + TIMER_B
        flow.send(ok, dialog.tx.destination)
        self._await_ack(dialog, ok)
        call.listener = self.observer.call_started("sip", dialog.call_id)
        dialog.observed = True
        log.info("SIP call %s answered: %s %s:%d, RTP port %d", dialog.call_id, params.codec,
                 params.remote_host, params.remote_port, endpoint.local_port)
        dialog.run_task = self._own(self._run(dialog), f"sip-call-{dialog.call_id}")

    def _await_ack(self, dialog: _Dialog, ok: bytes) -> None:
        acked = asyncio.Event()
        dialog.pending_ack = acked
        tx = dialog.tx
        send = (lambda: tx.flow.send(ok, tx.destination)) if tx.flow.transport == "UDP" else (lambda: None)

        def no_ack() -> None:
            log.warning("SIP call %s: no ACK for our 200 OK", dialog.call_id)
            self._end(dialog, "no ACK", send_bye=True)

        self._own(self._retransmit(send, acked, no_ack), "sip-retransmit-2xx")

    async def _run(self, dialog: _Dialog) -> None:
        reason = await dialog.call.run()
        self._end(dialog, reason, send_bye=True)

    # ------------------------------------------------------------ CANCEL
    def _on_cancel(self, request: sip.Request, flow: Flow) -> None:
        tx = self._invites.get(request.branch)
        if tx is None:
            self._reply(request, flow, 481)
            return
        self._reply(request, flow, 200)
        if tx.final is not None:
            return   # already answered: the CANCEL changes nothing (§9.2)
        dialog = next((d for d in self.dialogs.values() if d.tx is tx), None)
        self._reject_invite(tx, 487, to_tag=dialog.local_tag if dialog else None)
        if dialog is not None:
            self._end(dialog, "cancelled", send_bye=False)

    # ------------------------------------------------------------ in the dialog
    def _in_dialog(self, request: sip.Request, flow: Flow) -> None:
        dialog = self.dialogs.get((request.call_id, request.to_tag))
        method = request.method
        if dialog is None or dialog.ended:
            if method == "ACK":
                tx = self._invites.get(request.branch)
                if tx is not None:
                    tx.acked.set()
            elif method == "INVITE":
                tx = _InviteTx(request, flow, self._destination(request, flow))
                self._reject_invite(tx, 481)
            else:
                self._reply(request, flow, 481)
            return
        if method == "ACK":
            if request.branch in self._invites and self._invites[request.branch].final not in (None, 200):
                self._invites[request.branch].acked.set()
                return
            if dialog.pending_ack is not None:
                dialog.pending_ack.set()
                dialog.pending_ack = None
            if dialog.offerless and request.body and dialog.call is not None:
                self._apply_answer(dialog, request.body)
            return
        if method not in _IN_DIALOG:
            self._reply(request, flow, 405 if method in _NOT_ALLOWED else 501, headers=[("Allow", sip.ALLOW)])
            return
        if request.cseq <= dialog.remote_cseq and method != "ACK":
            if method == "INVITE" and request.branch in self._invites:
                tx = self._invites[request.branch]
                if tx.last_response is not None:
                    tx.flow.send(tx.last_response, tx.destination)
                return
            self._reply(request, flow, 500, headers=[("Retry-After", "1")])
            return
        dialog.remote_cseq = request.cseq
        if method == "BYE":
            self._reply(request, flow, 200)
            self._end(dialog, "caller hung up", send_bye=False)
        elif method == "INVITE":
            self._on_reinvite(dialog, request, flow)
        elif method == "INFO":
            digit = digit_from_info(request.header("Content-Type"), request.body)
            if digit is not None and dialog.call is not None:
                dialog.call.on_dtmf(digit, "info")
            self._reply(request, flow, 200)
        else:   # OPTIONS
            self._reply(request, flow, 200, headers=self._capabilities())

    def _on_reinvite(self, dialog: _Dialog, request: sip.Request, flow: Flow) -> None:
        tx = _InviteTx(request, flow, self._destination(request, flow))
        self._invites[request.branch] = tx
        if dialog.pending_ack is not None or dialog.call is None:
            return self._reject_invite(tx, 491, to_tag=dialog.local_tag)
        if request.body:
            try:
                offer = parse_sdp(request.body)
                index, params = negotiate(offer, self.sip.codecs)
            except NoCommonCodec:
                return self._reject_invite(tx, 488, to_tag=dialog.local_tag)
            except SdpError:
                return self._reject_invite(tx, 400, to_tag=dialog.local_tag)
            dialog.params = params
            dialog.call.endpoint.update(params)
            body = dialog.local_sdp.answer(offer, index, params)
        else:   # an offer in our 200, the answer in the ACK
            dialog.offerless = True
            body = dialog.local_sdp.offer(self.sip.codecs)
        if request.header("Contact"):
            try:
                dialog.remote_target = str(Address.parse_many(request.header("Contact"))[0].uri)
            except ValueError:
                pass
        ok = sip.response(request, flow.source, 200, to_tag=dialog.local_tag, body=body,
                          headers=[("Contact", self._contact(dialog.local_sdp.address, flow)), *self._capabilities()])
        tx.last_response, tx.final, tx.expires = ok, 200, self.clock() + TIMER_B
        flow.send(ok, tx.destination)
        self._await_ack(dialog, ok)

    def _apply_answer(self, dialog: _Dialog, body: bytes) -> None:
        try:
            _, params = negotiate(parse_sdp(body), self.sip.codecs)
        except SdpError as error:
            log.warning("SIP call %s: unusable SDP answer in ACK (%s): hanging up", dialog.call_id, error)
            self._end(dialog, "bad SDP answer", send_bye=True)
            return
        dialog.params = params
        dialog.offerless = False
        dialog.call.endpoint.update(params)

    # ------------------------------------------------------------ ending
    def _end(self, dialog: _Dialog, reason: str, *, send_bye: bool) -> None:
        if dialog.ended:
            return
        dialog.ended = True
        self.dialogs.pop(dialog.key, None)
        if dialog.pending_ack is not None:
            dialog.pending_ack.set()
        if send_bye:
            self._send_bye(dialog)
        current = asyncio.current_task()
        for task in (dialog.setup_task, dialog.run_task):
            if task is not None and task is not current:
                task.cancel()
        self._own(self._finish(dialog, reason), f"sip-end-{dialog.call_id}")

    async def _finish(self, dialog: _Dialog, reason: str) -> None:
        waits = [t for t in (dialog.setup_task, dialog.run_task) if t is not None and t is not asyncio.current_task()]
        await asyncio.gather(*waits, return_exceptions=True)
        if dialog.call is not None:
            await dialog.call.close()
        elif dialog.sock is not None:   # cancelled before the media started
            dialog.sock.close()
        summary = {"call_id": dialog.call_id, "reason": reason, "answered": dialog.call is not None}
        if dialog.call is not None and dialog.call.endpoint is not None:
            stats = dialog.call.endpoint.stats
            summary.update(rtp_received=stats.received, rtp_sent=stats.sent, rtp_malformed=stats.malformed,
                           latched=stats.latched, digits="".join(dialog.call.digits))
        self.ended_calls.append(summary)
        if dialog.observed:
            self.observer.call_ended("sip", dialog.call_id, reason)
        log.info("SIP call %s ended: %s %s", dialog.call_id, reason, summary)

    def _send_bye(self, dialog: _Dialog) -> None:
        flow = dialog.tx.flow
        dialog.local_cseq += 1
        branch = sip.new_branch()
        public = dialog.local_sdp.address
        host = f"[{public}]" if ":" in public else public
        via = f"SIP/2.0/{flow.transport} {host}:{self.local_port};branch={branch};rport"
        invite = dialog.invite
        data = sip.request("BYE", dialog.remote_target, via=via, from_=f"{invite.to};tag={dialog.local_tag}",
                           to=invite.from_, call_id=invite.call_id, cseq=dialog.local_cseq, routes=dialog.route_set)
        if flow.transport == "TCP":
            flow.send(data)
            return
        destination = self._next_hop(dialog)
        done = asyncio.Event()
        self._client[branch] = done
        self.send_udp(data, destination)

        async def retransmit() -> None:
            try:
                await self._retransmit(lambda: self.send_udp(data, destination), done)
            finally:
                self._client.pop(branch, None)

        self._own(retransmit(), "sip-bye")

    def _next_hop(self, dialog: _Dialog) -> tuple[str, int]:
        """Loose routing: the first Record-Route entry, else the caller's Contact."""
        uri = dialog.remote_target
        if dialog.route_set:
            uri = str(Address.parse(dialog.route_set[0]).uri)
        try:
            parsed = URI.parse(uri)
            return parsed.host.strip("[]"), parsed.port or 5060
        except ValueError:
            return dialog.tx.flow.source

    def _on_response(self, response) -> None:
        try:
            from sipmessage import Via

            branch = Via.parse_many(response.headers.get("Via") or "")[0].parameters.get("branch")
        except (ValueError, IndexError):
            return
        done = self._client.get(branch or "")
        if done is not None and response.code >= 200:
            done.set()

    # ------------------------------------------------------------ shutdown
    async def close(self) -> None:
        for dialog in list(self.dialogs.values()):
            if dialog.call is not None and dialog.pending_ack is None:
                self._end(dialog, "service closed", send_bye=True)
            else:
                self._end(dialog, "service closed", send_bye=False)
        await asyncio.sleep(0)
        # the BYEs went out once; their retransmissions and everything else stop here
        finishing = [t for t in self._tasks if t.get_name().startswith("sip-end-")]
        await asyncio.gather(*finishing, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def active_calls(self) -> int:
        return sum(1 for d in self.dialogs.values() if not d.ended)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("SIP task %s failed", task.get_name(), exc_info=task.exception())
