"""The SIP user agent server's dialog layer (RFC 3261 §12–§15), as gateways exercise it.

New INVITE: checks (hops, source allow-list, digest, Require, SDP → 488,
admission → 503 with Retry-After, §21.5.4 and §20.33) → 100 Trying → 180
Ringing → 200 OK with the SDP answer (§13.3).  The admission
(agent/admission.py) is the process's, shared with WebRTC: a call holds its
slot from the INVITE until its dialog ends, ringing included.  In the dialog: ACK, BYE (either side, §15), re-INVITE (new
address, codec or hold, §14), INFO (DTMF), OPTIONS (§11).  CANCEL while
ringing → 200 for the CANCEL and 487 for the INVITE (§9.2).  OPTIONS
outside a dialog answers 200, or 503 with Retry-After while no new call
would be admitted (draining, busy): a proxy's health probe.  The
transactions under all this — retransmissions, their timers, matching by
branch — are `transactions.py`.

Routing: responses go to the top Via's source (with `received`/`rport`,
RFC 3581); our BYE follows the route set learnt from Record-Route (loose
routing, §12.2.1.1) or goes to the caller's Contact — through Kamailio when
it record-routes.

The call itself is not built here: an answered call's agent comes from the
`call_factory` (`call.CallFactory`), and runs in a `call.SipCall` on the
dialog's RTP endpoint.  The SIP stack knows no engines.

Tasks: one `TaskOwner` (``self.tasks``) owns everything: per call a set-up
task (answer, possibly after a ring delay) and a media task
(`SipCall.run`), each call's closing task, and the retransmission loops;
`close()` ends every call and awaits them all.  No exception from a message
escapes `handle`: a bug in one request answers 500, it does not stop the
server.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sipmessage import URI, Address, Response

from sub300.agent.admission import Admission, Refusal, Ticket
from sub300.agent.calls import CallContext, CallObserver
from sub300.agent.events import TransportStats
from sub300.agent.log_format import bind_call
from sub300.agent.tasks import TaskOwner

from . import message as sip
from .auth import DigestAuth, SourceFilter
from .call import CallAgent, CallFactory, CallSetup, SipCall
from .dtmf import digit_from_info
from .g711 import RATE
from .rtp import PortAllocator, RtpEndpoint
from .sdp import AudioParams, LocalDescription, NoCommonCodec, SdpError, negotiate
from .sdp import parse as parse_sdp
from .transactions import InviteServerTransaction, Transactions
from .transport import Flow

if TYPE_CHECKING:
    from sub300.agent.config import SipConfig

log = logging.getLogger(__name__)
_IN_DIALOG = {"ACK", "BYE", "INFO", "OPTIONS", "INVITE"}
_NOT_ALLOWED = {"REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "UPDATE", "PRACK"}


@dataclass
class Dialog:
    """One call's dialog state (§12): identifiers, route set, SDP, and the call once answered."""

    invite: sip.Request
    tx: InviteServerTransaction
    local_tag: str
    remote_target: str
    route_set: list[str]
    local_sdp: LocalDescription
    params: AudioParams | None
    offerless: bool
    remote_cseq: int
    sock: socket.socket | None = None          # the RTP socket, until an endpoint owns it
    local_cseq: int = 1
    call: SipCall | None = None                # set when its media is open (just before the 200 OK)
    setup_task: asyncio.Task | None = None
    run_task: asyncio.Task | None = None
    pending_ack: asyncio.Event | None = None   # a 2xx (INVITE or re-INVITE) waiting for its ACK
    observed: bool = False
    ended: bool = False
    ticket: Ticket | None = None               # the admission slot, released when the dialog ends

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    @property
    def key(self) -> tuple[str, str]:
        return self.invite.call_id, self.local_tag

    @property
    def endpoint(self) -> RtpEndpoint | None:
        """The call's RTP endpoint, once the call is answered."""
        return self.call.endpoint if self.call is not None else None


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
    """Answers calls per the ``sip`` configuration section; each answered call's agent comes from ``call_factory``.

    ``send_udp(data, (host, port))`` sends from the SIP socket; ``local_port``
    is the SIP port written into Contact and Via.  ``observer`` hears of
    every answered call (`call_started` after the 200 OK, `call_ended` once).
    ``admission``: the process's (shared with WebRTC); without one, ``sip.max_calls`` alone.
    ``invite_limit(source_ip)``: None to go on, or a refusal with ``retry_after_s`` and ``message``
    (agent/auth/limits.py `Limits.sip_invite`: ``auth.sip_invites_per_minute``); it is asked once per
    new INVITE transaction outside a dialog — never for a retransmission or a re-INVITE.  A refused
    INVITE gets 503 with Retry-After: SIP has no 429, and RFC 3261 §21.5.4 lets a 503 carry Retry-After
    (a proxy then tries another server or waits).  With digest authentication, the challenged INVITE and
    its retry with credentials are two INVITEs.  ``record_audio``: what the calls' `CallContext` says.
    """

    def __init__(self, sip_config: SipConfig, call_factory: CallFactory, observer: CallObserver,
                 send_udp: Callable[[bytes, tuple[str, int]], None], *, local_port: int,
                 auth: DigestAuth | None = None, answer_delay_s: float = 0.0, clock=time.monotonic,
                 admission: Admission | None = None,
                 invite_limit: Callable[[str], Any] | None = None, record_audio: bool = False):
        self.sip = sip_config
        self.invite_limit = invite_limit
        self.record_audio = record_audio
        self.admission = admission or Admission.per_transport("sip", sip_config.max_calls)
        self.call_factory = call_factory
        self.observer = observer
        self.send_udp = send_udp
        self.local_port = local_port
        self.sources = SourceFilter(self.sip.allowed_sources)
        self.auth = auth
        self.answer_delay_s = answer_delay_s
        self.clock = clock
        self.ports = PortAllocator(self.sip.rtp_port_min, self.sip.rtp_port_max)
        self.dialogs: dict[tuple[str, str], Dialog] = {}
        self.tasks = TaskOwner("sip")
        self._calls = self.tasks.child("calls")        # set-up and media tasks
        self._ending = self.tasks.child("ending")      # each ended call's teardown
        self.transactions = Transactions(send_udp, self.tasks.child("transactions"), clock)
        self.malformed = 0
        #: the last calls' outcomes (call id, reason, RTP counters, digits): for logs, admin pages and tests
        self.ended_calls: deque[dict] = deque(maxlen=100)

    # ------------------------------------------------------------ entry
    def handle(self, data: bytes, flow: Flow) -> None:
        """One message from the network.  Never raises."""
        try:
            self.transactions.prune()
            try:
                parsed = sip.parse(data)
            except (ValueError, KeyError, IndexError, TypeError) as error:
                self._malformed(data, flow, str(error) or type(error).__name__)
                return
            if isinstance(parsed, Response):
                self.transactions.on_response(parsed)
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

    def _reply(self, request: sip.Request, flow: Flow, status: int, **kw) -> bytes:
        return self.transactions.reply(request, flow, status, **kw)

    # ------------------------------------------------------------ dispatch
    def _dispatch(self, request: sip.Request, flow: Flow) -> None:
        method = request.method
        if method not in ("INVITE", "ACK") and self.transactions.replay(request):
            return   # a retransmitted request: the same answer again
        if method == "CANCEL":
            self._on_cancel(request, flow)
            return
        if request.to_tag is not None:
            self._in_dialog(request, flow)
            return
        if method == "INVITE":
            self._on_invite(request, flow)
        elif method == "ACK":
            self.transactions.ack_error(request.branch)   # ACK of our error response
        elif method == "OPTIONS":
            self._on_options(request, flow)
        elif method in ("BYE", "INFO"):
            self._reply(request, flow, 481)
        elif method in _NOT_ALLOWED:
            self._reply(request, flow, 405, headers=[("Allow", sip.ALLOW)])
        else:
            self._reply(request, flow, 501, headers=[("Allow", sip.ALLOW)])

    def _on_options(self, request: sip.Request, flow: Flow) -> None:
        """OPTIONS outside a dialog (§11.2): 200 with our capabilities while a new call would be admitted; else
        503 with Retry-After (§21.5.4) and a Warning that says why: the server drains, it is busy (capacity full
        or engine queues saturated: `Admission.remaining_calls` is 0), or ``sip.max_calls`` calls are up.  A
        proxy that probes its destinations with OPTIONS (Kamailio's dispatcher: only 2xx keeps a destination
        active) then sends new calls elsewhere before any INVITE is refused (scripts/kamailio/)."""
        admission = self.admission
        cap = admission.transport_caps.get("sip")
        why = ("draining" if admission.draining else
               "busy" if admission.remaining_calls() == 0 else
               "sip.max_calls reached" if cap is not None and admission.active_calls("sip") >= cap else None)
        if why is None:
            self._reply(request, flow, 200, headers=self._capabilities())
            return
        self._reply(request, flow, 503, headers=[("Retry-After", str(admission.retry_after_s)),
                                                 ("Warning", f'399 sub300 "{why}"'), *self._capabilities()])

    @staticmethod
    def _capabilities() -> list[tuple[str, str]]:
        return [("Allow", sip.ALLOW), ("Accept", "application/sdp"), ("Supported", ""), ("Accept-Language", "en")]

    # ------------------------------------------------------------ new calls
    def _on_invite(self, request: sip.Request, flow: Flow) -> None:
        tx = self.transactions.invites.get(request.branch)
        if tx is not None:   # retransmitted INVITE: repeat the last answer
            tx.resend()
            return
        tx = self.transactions.begin_invite(request, flow)
        reject = self.transactions.reject
        max_forwards = request.header("Max-Forwards")
        if max_forwards is not None and max_forwards.strip() == "0":
            return reject(tx, 483)
        if not self.sources.allows(flow.source[0]):
            log.warning("INVITE from %s refused: not in sip.allowed_sources", flow.source[0])
            return reject(tx, 403)
        refused = self.invite_limit(flow.source[0]) if self.invite_limit is not None else None
        if refused is not None:   # 503, not 429: SIP has no 429 (see the class docstring)
            log.warning("INVITE from %s refused: %s", flow.source[0], refused.message)
            return reject(tx, 503, [("Retry-After", str(refused.retry_after_s)),
                                    ("Warning", f'399 sub300 "{refused.message}"')])
        if self.auth is not None:
            verdict = self.auth.check(request.header("Authorization"), "INVITE")
            if verdict in ("missing", "stale"):
                return reject(tx, 401, [("WWW-Authenticate", self.auth.challenge(stale=verdict == "stale"))])
            if verdict != "ok":
                log.warning("INVITE from %s refused: bad credentials", flow.source[0])
                return reject(tx, 403)
        required = [r.strip() for h in request.headers("Require") for r in h.split(",") if r.strip()]
        if required:
            return reject(tx, 420, [("Unsupported", ", ".join(required))])
        contact = request.header("Contact")
        try:
            target = str(Address.parse_many(contact)[0].uri) if contact else ""
        except ValueError:
            target = ""
        if not target:
            return reject(tx, 400)
        offer, params, index = None, None, 0
        if request.body:
            try:
                offer = parse_sdp(request.body)
                index, params = negotiate(offer, self.sip.codecs)
            except NoCommonCodec as error:
                log.info("INVITE from %s: %s", flow.source[0], error)
                return reject(tx, 488, [("Warning", '305 sub300 "Incompatible media format"')])
            except SdpError as error:
                log.info("INVITE from %s: bad SDP: %s", flow.source[0], error)
                return reject(tx, 400)
        ticket = self.admission.try_admit("sip")
        if isinstance(ticket, Refusal):
            log.warning("INVITE from %s refused: %s", flow.source[0], ticket.message)
            warning = ticket.message.replace('"', "'").replace("\\", "/")
            return reject(tx, 503, [("Retry-After", str(ticket.retry_after_s)),
                                    ("Warning", f'399 sub300 "{warning}"')])   # §20.43: 399 = miscellaneous
        try:
            sock = self.ports.bind(self.sip.host)
        except OSError as error:
            ticket.release()
            log.error("no RTP port for a call: %s", error)
            return reject(tx, 503, [("Retry-After", str(self.admission.retry_after_s))])
        try:
            tx.send(sip.response(request, flow.source, 100))
            routes = [str(a) for h in request.headers("Record-Route") for a in Address.parse_many(h)]
            public = self.sip.public_address or (self.sip.host if self.sip.host not in ("0.0.0.0", "::") else _local_ip_for(flow.source[0]))
            dialog = Dialog(request, tx, sip.new_tag(), target, routes, LocalDescription(public, sock.getsockname()[1]),
                            params, offerless=offer is None, remote_cseq=request.cseq, sock=sock, ticket=ticket)
        except Exception:   # `handle` answers 500; the slot and the port must not stay taken
            ticket.release()
            sock.close()
            raise
        self.dialogs[dialog.key] = dialog
        tx.send(sip.response(request, flow.source, 180, to_tag=dialog.local_tag, record_route=True,
                             headers=[("Contact", self._contact(public, flow))]))
        dialog.setup_task = self._calls.spawn(self._answer(dialog, offer, index, sock, public, flow),
                                              f"sip-answer-{request.call_id}")

    def _contact(self, public: str, flow: Flow) -> str:
        host = f"[{public}]" if ":" in public else public
        return f"<sip:sub300@{host}:{self.local_port};transport={flow.transport.lower()}>"

    async def _answer(self, dialog: Dialog, offer, index: int, sock: socket.socket, public: str, flow: Flow) -> None:
        """Ring for ``answer_delay_s``, make the call (factory + RTP endpoint), send the 200 OK and start the media."""
        bind_call(dialog.call_id)   # the call's own task: its logs, the RTP socket's and the media task's carry it
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        params = dialog.params or AudioParams("0.0.0.0", 0, self.sip.codecs[0],
                                              {"PCMU": 0, "PCMA": 8}[self.sip.codecs[0]], None, "sendrecv")
        agent: CallAgent | None = None
        endpoint: RtpEndpoint | None = None
        try:
            invite = dialog.invite
            agent = self.call_factory(CallSetup(dialog.call_id, invite.from_, invite.to, flow.source, params,
                                                RATE, self.clock))
            call = SipCall(dialog.call_id, agent, clock=self.clock)
            endpoint = RtpEndpoint(params, call.on_audio, call.on_dtmf, clock=self.clock,
                                   latching=self.sip.rtp_latching)
            await endpoint.open(sock)
        except BaseException as error:
            if endpoint is not None:
                endpoint.close()
            sock.close()   # no-op when the endpoint owned it
            dialog.sock = None
            if agent is not None:
                try:
                    await agent.aclose()
                except Exception:
                    log.exception("SIP call %s: closing the agent of a failed set-up failed", dialog.call_id)
            if not isinstance(error, Exception):
                raise   # cancelled: whoever cancelled ends the dialog
            log.exception("SIP call %s: setting up the call failed", dialog.call_id)
            if dialog.tx.final is None:
                self.transactions.reject(dialog.tx, 500, to_tag=dialog.local_tag)
            self._end(dialog, "set-up failed", send_bye=False)
            return
        call.endpoint = endpoint
        dialog.call = call
        body = dialog.local_sdp.offer(self.sip.codecs) if offer is None else dialog.local_sdp.answer(offer, index, params)
        ok = sip.response(dialog.invite, flow.source, 200, to_tag=dialog.local_tag, record_route=True, body=body,
                          headers=[("Contact", self._contact(public, flow)), *self._capabilities()])
        self._accept(dialog, dialog.tx, ok)
        call.listener = self.observer.call_started(
            "sip", dialog.call_id, CallContext(source=flow.source[0], record_audio=self.record_audio))
        dialog.observed = True
        call.set_held(params.held)   # an offer may start on hold (c=0.0.0.0 until the address is known)
        log.info("SIP call %s answered: %s %s:%d, RTP port %d", dialog.call_id, params.codec,
                 params.remote_host, params.remote_port, endpoint.local_port)
        dialog.run_task = self._calls.spawn(self._run(dialog, call), f"sip-call-{dialog.call_id}")

    def _accept(self, dialog: Dialog, tx: InviteServerTransaction, ok: bytes) -> None:
        """Send a 2xx (INVITE or re-INVITE); no ACK within 64·T1 hangs up (§13.3.1.4)."""
        def no_ack() -> None:
            log.warning("SIP call %s: no ACK for our 200 OK", dialog.call_id)
            self._end(dialog, "no ACK", send_bye=True)

        dialog.pending_ack = self.transactions.accept(tx, ok, no_ack)

    async def _run(self, dialog: Dialog, call: SipCall) -> None:
        reason = await call.run()
        self._end(dialog, reason, send_bye=True)

    # ------------------------------------------------------------ CANCEL
    def _on_cancel(self, request: sip.Request, flow: Flow) -> None:
        tx = self.transactions.invites.get(request.branch)
        if tx is None:
            self._reply(request, flow, 481)
            return
        self._reply(request, flow, 200)
        if tx.final is not None:
            return   # already answered: the CANCEL changes nothing (§9.2)
        dialog = next((d for d in self.dialogs.values() if d.tx is tx), None)
        self.transactions.reject(tx, 487, to_tag=dialog.local_tag if dialog else None)
        if dialog is not None:
            self._end(dialog, "cancelled", send_bye=False)

    # ------------------------------------------------------------ in the dialog
    def _in_dialog(self, request: sip.Request, flow: Flow) -> None:
        dialog = self.dialogs.get((request.call_id, request.to_tag or ""))
        method = request.method
        if dialog is None or dialog.ended:
            if method == "ACK":
                self.transactions.ack_error(request.branch)
            elif method == "INVITE":
                self.transactions.reject(self.transactions.begin_invite(request, flow), 481)
            else:
                self._reply(request, flow, 481)
            return
        if method == "ACK":
            if self.transactions.ack_error(request.branch):
                return
            if dialog.pending_ack is not None:
                dialog.pending_ack.set()
                dialog.pending_ack = None
            endpoint = dialog.endpoint
            if dialog.offerless and request.body and endpoint is not None:
                self._apply_answer(dialog, endpoint, request.body)
            return
        if method not in _IN_DIALOG:
            self._reply(request, flow, 405 if method in _NOT_ALLOWED else 501, headers=[("Allow", sip.ALLOW)])
            return
        if request.cseq <= dialog.remote_cseq:
            if method == "INVITE" and request.branch in self.transactions.invites:
                self.transactions.invites[request.branch].resend()
                return
            self._reply(request, flow, 500, headers=[("Retry-After", "1")])   # §12.2.2: CSeq out of order
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

    def _on_reinvite(self, dialog: Dialog, request: sip.Request, flow: Flow) -> None:
        """A re-INVITE (§14.2): new remote address, codec or hold; or no SDP, then our offer in the 200."""
        tx = self.transactions.begin_invite(request, flow)
        reject = self.transactions.reject
        endpoint = dialog.endpoint
        if dialog.pending_ack is not None or endpoint is None:
            return reject(tx, 491, to_tag=dialog.local_tag)
        if request.body:
            try:
                offer = parse_sdp(request.body)
                index, params = negotiate(offer, self.sip.codecs)
            except NoCommonCodec:
                return reject(tx, 488, to_tag=dialog.local_tag)
            except SdpError:
                return reject(tx, 400, to_tag=dialog.local_tag)
            dialog.params = params
            endpoint.update(params)
            if dialog.call is not None:   # hold or resume (RFC 3264 §8.4)
                dialog.call.set_held(params.held, drop_rest=self.sip.on_resume == "drop")
            body = dialog.local_sdp.answer(offer, index, params)
        else:   # an offer in our 200, the answer in the ACK
            dialog.offerless = True
            body = dialog.local_sdp.offer(self.sip.codecs)
        contact = request.header("Contact")
        if contact:
            try:
                dialog.remote_target = str(Address.parse_many(contact)[0].uri)
            except ValueError:
                pass
        ok = sip.response(request, flow.source, 200, to_tag=dialog.local_tag, body=body,
                          headers=[("Contact", self._contact(dialog.local_sdp.address, flow)), *self._capabilities()])
        self._accept(dialog, tx, ok)

    def _apply_answer(self, dialog: Dialog, endpoint: RtpEndpoint, body: bytes) -> None:
        try:
            _, params = negotiate(parse_sdp(body), self.sip.codecs)
        except SdpError as error:
            log.warning("SIP call %s: unusable SDP answer in ACK (%s): hanging up", dialog.call_id, error)
            self._end(dialog, "bad SDP answer", send_bye=True)
            return
        dialog.params = params
        dialog.offerless = False
        endpoint.update(params)
        if dialog.call is not None:
            dialog.call.set_held(params.held, drop_rest=self.sip.on_resume == "drop")

    # ------------------------------------------------------------ ending
    def _end(self, dialog: Dialog, reason: str, *, send_bye: bool) -> None:
        """End a dialog once: BYE if asked, stop its tasks, and tear the call down in a task of its own."""
        if dialog.ended:
            return
        dialog.ended = True
        self.dialogs.pop(dialog.key, None)
        if dialog.ticket is not None:
            dialog.ticket.release()
        if dialog.pending_ack is not None:
            dialog.pending_ack.set()
        if send_bye:
            self._send_bye(dialog)
        current = asyncio.current_task()
        for task in (dialog.setup_task, dialog.run_task):
            if task is not None and task is not current:
                task.cancel()
        self._ending.spawn(self._finish(dialog, reason), f"sip-end-{dialog.call_id}")

    async def _finish(self, dialog: Dialog, reason: str) -> None:
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
                           rtp_strangers=stats.strangers, rtp_other_ssrc=stats.other_ssrc, latched=stats.latched,
                           digits="".join(dialog.call.digits))
        self.ended_calls.append(summary)
        if dialog.observed and dialog.call is not None and dialog.call.endpoint is not None:
            endpoint = dialog.call.endpoint
            dialog.call._safe_listener(TransportStats(endpoint.stats.received, endpoint.packets_lost))
        if dialog.observed:
            self.observer.call_ended("sip", dialog.call_id, reason)
        log.info("SIP call %s ended: %s %s", dialog.call_id, reason, summary)

    def _send_bye(self, dialog: Dialog) -> None:
        """Our BYE (§15.1.1), in the dialog: next CSeq, our tag in From, along the route set."""
        flow = dialog.tx.flow
        dialog.local_cseq += 1
        branch = sip.new_branch()
        public = dialog.local_sdp.address
        host = f"[{public}]" if ":" in public else public
        via = f"SIP/2.0/{flow.transport} {host}:{self.local_port};branch={branch};rport"
        invite = dialog.invite
        data = sip.request("BYE", dialog.remote_target, via=via, from_=f"{invite.to};tag={dialog.local_tag}",
                           to=invite.from_, call_id=invite.call_id, cseq=dialog.local_cseq, routes=dialog.route_set)
        self.transactions.request(data, flow, self._next_hop(dialog), branch)

    def _next_hop(self, dialog: Dialog) -> tuple[str, int]:
        """Loose routing: the first Record-Route entry, else the caller's Contact."""
        uri = dialog.remote_target
        if dialog.route_set:
            uri = str(Address.parse(dialog.route_set[0]).uri)
        try:
            parsed = URI.parse(uri)
            return parsed.host.strip("[]"), parsed.port or 5060
        except ValueError:
            return dialog.tx.flow.source

    # ------------------------------------------------------------ shutdown
    async def close(self) -> None:
        """Hang up every call (BYE for answered, ACKed ones), wait for their teardown, then stop every task."""
        for dialog in list(self.dialogs.values()):
            answered = dialog.call is not None and dialog.pending_ack is None
            self._end(dialog, "service closed", send_bye=answered)
        await asyncio.sleep(0)
        # the BYEs went out once; their retransmissions and everything else stop here
        await asyncio.gather(*self._ending.all_tasks(), return_exceptions=True)
        await self.tasks.aclose()

    @property
    def active_calls(self) -> int:
        """Calls set up or in progress (ringing ones included)."""
        return sum(1 for d in self.dialogs.values() if not d.ended)
