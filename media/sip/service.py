"""`start_sip_service`: the phone entry point that `sub300 serve` starts beside the web server."""
from __future__ import annotations

import logging
import os

from sub300.agent.calls import CallObserver, LoggingObserver
from sub300.agent.config import Config
from sub300.agent.engines import Engines

from .auth import DigestAuth
from .dialogs import UserAgentServer
from .transport import SipTransport

log = logging.getLogger(__name__)


class SipService:
    def __init__(self, transport: SipTransport, uas: UserAgentServer):
        self.transport, self.uas = transport, uas

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the service listens on (port 0 in the config picks a free one)."""
        return self.transport.address

    @property
    def active_calls(self) -> int:
        return self.uas.active_calls

    async def close(self) -> None:
        """Hang up every call (BYE), stop listening, and wait for every task."""
        await self.uas.close()
        await self.transport.close()


async def start_sip_service(config: Config, engines: Engines, observer: CallObserver | None = None, *,
                            answer_delay_s: float = 0.0, tcp: bool = True) -> SipService:
    """Listen for SIP on config.sip.host:port (UDP, and TCP on the same port).

    `answer_delay_s` keeps a call ringing that long before the 200 OK (tests use it to CANCEL).
    """
    sip = config.sip
    auth = None
    if sip.auth_username:
        password = os.environ.get(sip.auth_password_env, "")
        if not password:
            raise ValueError(f"sip.auth_username is set but ${sip.auth_password_env} is empty")
        auth = DigestAuth(sip.auth_username, password, sip.realm)
    if not sip.allowed_sources and auth is None:
        log.warning("SIP: no sip.allowed_sources and no digest auth: anyone who reaches the port can call")
    holder: dict[str, UserAgentServer] = {}
    transport = SipTransport(lambda data, flow: holder["uas"].handle(data, flow) if "uas" in holder else None)
    await transport.start(sip.host, sip.port, tcp=tcp)
    uas = UserAgentServer(config, engines, observer or LoggingObserver(), transport.send_udp,
                          local_port=transport.address[1], auth=auth, answer_delay_s=answer_delay_s)
    holder["uas"] = uas
    log.info("SIP listening on %s:%d (UDP%s)", *transport.address, "+TCP" if transport._tcp else "")
    return SipService(transport, uas)
