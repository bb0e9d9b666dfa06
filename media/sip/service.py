"""`start_sip_service`: the phone entry point that `sub300 serve` starts beside the web server.

This is where the SIP stack meets the engines: `conversation_calls` is the
call factory that gives each answered call a `Conversation` over the shared
engines.  Everything below it (`dialogs`, `transactions`, `call`, `rtp`)
takes a factory and knows no engines, so protocol tests run it with a
trivial agent and no model loaded.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from sub300.agent.admission import Admission
from sub300.agent.auth.limits import Limits
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.calls import CallObserver, LoggingObserver
from sub300.agent.playout import PlayoutQueue
from sub300.agent.recording import open_recording

from .auth import DigestAuth, SourceFilter
from .call import CallAgent, CallFactory, CallSetup
from .dialogs import UserAgentServer
from .transport import SipTransport, TcpLimits

if TYPE_CHECKING:
    from sub300.agent.config import Config
    from sub300.agent.engines import Engines

log = logging.getLogger(__name__)


def conversation_calls(engines: Engines, config: Config, behaviour: Behaviour = DEFAULT_BEHAVIOUR) -> CallFactory:
    """The call factory of the server: a fresh `Conversation` per call, on the shared engines, with
    the user's ``behaviour`` (agent/behaviour.py).

    Its playout queue runs at the call's rate (8 kHz for G.711), so the reply
    resamples TTS straight to the line's rate.
    """
    from sub300.agent.conversation import Conversation

    def make(setup: CallSetup) -> CallAgent:
        playout = PlayoutQueue(setup.sample_rate, setup.clock)
        conversation = Conversation(engines, config, playout, setup.clock, behaviour=behaviour)
        # SIP has no keys: records.record_audio alone asks (the CallContext the dialog layer reports says so too)
        conversation.record_to(open_recording(config, setup.call_id, None, setup.sample_rate))
        return conversation

    return make


class SipService:
    """A running SIP service: its transport (UDP + TCP sockets) and its user agent server."""

    def __init__(self, transport: SipTransport, uas: UserAgentServer):
        self.transport, self.uas = transport, uas

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the service listens on (port 0 in the config picks a free one)."""
        return self.transport.address

    @property
    def active_calls(self) -> int:
        return self.uas.active_calls

    def end_calls_politely(self, goodbye: str) -> None:
        """The server drains (sub300/drain.py): each answered call's agent finishes its turn, says
        ``goodbye`` and hangs up (BYE, after the goodbye has played: `Conversation.end_politely`); a call
        still ringing is answered 503 with Retry-After; an agent that cannot end politely (a protocol
        test's) gets BYE now.  Returns at once; `active_calls` falls to 0 as the calls end."""
        from sub300.agent.conversation import DRAIN

        uas = self.uas
        for dialog in list(uas.dialogs.values()):
            if dialog.ended:
                continue
            if dialog.call is None:   # ringing: no agent yet
                if dialog.tx.final is None:
                    uas.transactions.reject(dialog.tx, 503, [("Retry-After", str(uas.admission.retry_after_s))],
                                            to_tag=dialog.local_tag)
                uas._end(dialog, DRAIN, send_bye=False)
                continue
            end = getattr(dialog.call.agent, "end_politely", None)
            if end is None:
                log.info("SIP call %s: its agent cannot end politely; BYE now", dialog.call_id)
                uas._end(dialog, DRAIN, send_bye=dialog.pending_ack is None)
            else:
                end(DRAIN, goodbye)

    async def end_calls(self, reason: str) -> None:
        """End every call at once (BYE for answered, ACKed ones) and wait for their teardown; keep listening."""
        uas = self.uas
        for dialog in list(uas.dialogs.values()):
            uas._end(dialog, reason, send_bye=dialog.call is not None and dialog.pending_ack is None)
        await asyncio.sleep(0)
        await asyncio.gather(*uas._ending.all_tasks(), return_exceptions=True)

    async def close(self) -> None:
        """Hang up every call (BYE), stop listening, and wait for every task."""
        await self.uas.close()
        await self.transport.close()


async def start_sip_service(config: Config, engines: Engines | None, observer: CallObserver | None = None, *,
                            answer_delay_s: float = 0.0, tcp: bool = True,
                            call_factory: CallFactory | None = None,
                            admission: Admission | None = None, auth_limits: Limits | None = None,
                            behaviour: Behaviour = DEFAULT_BEHAVIOUR) -> SipService:
    """Listen for SIP on config.sip.host:port (UDP, and TCP on the same port unless ``tcp`` is false).

    Each answered call talks to ``call_factory``'s agent, by default a
    `Conversation` over ``engines`` (`conversation_calls`); with a factory
    given, ``engines`` may be None.  ``admission``: the process's, shared
    with WebRTC (`sub300 serve`); without one, ``sip.max_calls`` alone limits
    the calls.  ``auth_limits``: the INVITE rate per source (``auth.sip_invites_per_minute``; default a
    `Limits` of its own from ``config.auth``).  ``answer_delay_s`` keeps a call ringing
    that long before the 200 OK (tests use it to CANCEL).  Raises
    `ValueError` when digest auth is configured without its password, and
    `OSError` when the port cannot be bound.
    """
    sip = config.sip
    if call_factory is None:
        if engines is None:
            raise ValueError("start_sip_service needs engines or a call_factory")
        call_factory = conversation_calls(engines, config, behaviour)
    auth = None
    if sip.auth_username:
        password = os.environ.get(sip.auth_password_env, "")
        if not password:
            raise ValueError(f"sip.auth_username is set but ${sip.auth_password_env} is empty")
        auth = DigestAuth(sip.auth_username, password, sip.realm, ttl_s=sip.nonce_ttl_s, max_nonces=sip.max_nonces)
    if not sip.allowed_sources and auth is None:
        log.warning("SIP: no sip.allowed_sources and no digest auth: anyone who reaches the port can call")
    holder: dict[str, UserAgentServer] = {}
    limits = TcpLimits(sip.tcp_message_timeout_s, sip.tcp_idle_timeout_s, sip.tcp_max_connections,
                       sip.tcp_max_connections_per_source, sip.max_message_bytes)
    transport = SipTransport(lambda data, flow: holder["uas"].handle(data, flow) if "uas" in holder else None,
                             limits=limits, accept=SourceFilter(sip.allowed_sources).allows,
                             in_use=lambda flow: "uas" in holder and any(
                                 d.tx.flow is flow for d in holder["uas"].dialogs.values()))
    await transport.start(sip.host, sip.port, tcp=tcp)
    uas = UserAgentServer(sip, call_factory, observer or LoggingObserver(), transport.send_udp,
                          local_port=transport.address[1], auth=auth, answer_delay_s=answer_delay_s,
                          admission=admission, invite_limit=(auth_limits or Limits(config.auth)).sip_invite,
                          record_audio=config.records.record_audio)
    holder["uas"] = uas
    log.info("SIP listening on %s:%d (UDP%s)", *transport.address, "+TCP" if transport._tcp else "")
    return SipService(transport, uas)
