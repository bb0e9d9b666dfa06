"""SIP transactions and their timers (RFC 3261 §17), as a user agent server needs them.

* INVITE server transactions (§17.2.1): a retransmitted INVITE gets the last
  response again; a final error response is retransmitted over UDP (Timer G:
  T1, doubling up to T2) until its ACK, for at most 64·T1 (Timer H) — at most
  ``MAX_RETRANSMITTING`` at once: under a flood further ones go out once.
* 2xx to INVITE (§13.3.1.4): the user agent itself retransmits its 200 OK
  over UDP until the ACK arrives, and gives up (the caller is told to hang
  up by the dialog layer) after 64·T1.
* Non-INVITE server transactions (§17.2.2): the final response is kept for
  64·T1 (Timer J) and sent again for every retransmitted request.
* Non-INVITE client transactions (§17.1.2): our BYE is retransmitted over UDP
  (Timer E) until a final response, for at most 64·T1 (Timer F).

Over TCP nothing is retransmitted (§17.1.2.2, §17.2.1): the transport is
reliable.  Transactions are matched by the top Via's branch (§17.2.3).
Retransmission loops are tasks owned by the `TaskOwner` given to
`Transactions`; closing that owner stops them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sipmessage import Via

from sub300.agent.tasks import TaskOwner

from . import message as sip
from .transport import Flow

log = logging.getLogger(__name__)
T1, T2 = 0.5, 4.0            # §17.1.1.1: RTT estimate and the cap of the retransmission interval (seconds)
TIMER_B = 64 * T1            # Timers B/F/H/J: give up waiting for an ACK or a response after this
MAX_RETRANSMITTING = 256     # error responses resent until their ACK at once; beyond, each is sent once, so a
                             # flood of spoofed-source UDP INVITEs is not amplified (RFC 3261 §26.1.5)


@dataclass
class InviteServerTransaction:
    """An INVITE server transaction (§17.2.1): what to resend when the INVITE comes again, and whether it was ACKed.

    ``final`` is the final status sent (None while only provisional ones
    went out); ``expires`` is when the transaction is forgotten (clock
    seconds, 0 while it is still in progress).
    """

    request: sip.Request
    flow: Flow
    destination: tuple[str, int]
    last_response: bytes | None = None
    final: int | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float = 0.0

    def send(self, data: bytes, *, final: int | None = None, expires: float = 0.0) -> None:
        """Send a response of this transaction and remember it for a retransmitted INVITE."""
        self.last_response = data
        if final is not None:
            self.final, self.expires = final, expires
        self.flow.send(data, self.destination)

    def resend(self) -> None:
        """The INVITE came again: the last response again (nothing when none was sent yet)."""
        if self.last_response is not None:
            self.flow.send(self.last_response, self.destination)


async def retransmit(send: Callable[[], None], done: asyncio.Event, clock: Callable[[], float],
                     on_timeout: Callable[[], None] | None = None) -> None:
    """Call ``send()`` at T1, 2·T1, 4·T1 … (capped at T2) until ``done`` is set or 64·T1 have passed.

    The first transmission is the caller's; this sends only the repeats.
    ``on_timeout`` runs when the time is up and ``done`` is still not set.
    """
    interval, deadline = T1, clock() + TIMER_B
    while clock() < deadline:
        try:
            await asyncio.wait_for(done.wait(), timeout=min(interval, max(0.0, deadline - clock())))
            return
        except TimeoutError:
            pass
        if clock() >= deadline:
            break
        send()
        interval = min(interval * 2, T2)
    if on_timeout is not None and not done.is_set():
        on_timeout()


class Transactions:
    """The transaction layer of one user agent server: state keyed by Via branch, timers as owned tasks.

    ``send_udp(data, (host, port))`` sends from the SIP socket (for requests
    we originate); ``tasks`` owns the retransmission loops.
    """

    def __init__(self, send_udp: Callable[[bytes, tuple[str, int]], None], tasks: TaskOwner,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.send_udp = send_udp
        self.tasks = tasks
        self.clock = clock
        self.invites: dict[str, InviteServerTransaction] = {}
        self._answered: dict[tuple[str, str], tuple[bytes, Flow, tuple[str, int], float]] = {}
        self._client: dict[str, asyncio.Event] = {}
        self._retransmitting = 0     # error responses being resent (Timer G) now
        self._flooded = False

    def prune(self) -> None:
        """Forget transactions whose time is up (called for every message)."""
        now = self.clock()
        for branch in [b for b, tx in self.invites.items() if tx.expires and tx.expires < now]:
            del self.invites[branch]
        for key in [k for k, v in self._answered.items() if v[3] < now]:
            del self._answered[key]

    @staticmethod
    def destination(request: sip.Request, flow: Flow) -> tuple[str, int]:
        """Where responses go: the top Via's `received`/`rport` over UDP (§18.2.2, RFC 3581), the connection over TCP."""
        return sip.response_destination(request, flow.source) if flow.transport == "UDP" else flow.source

    # ------------------------------------------------------------ INVITE server transactions
    def begin_invite(self, request: sip.Request, flow: Flow) -> InviteServerTransaction:
        """A new INVITE server transaction (the caller checked it is not a retransmission)."""
        tx = InviteServerTransaction(request, flow, self.destination(request, flow))
        self.invites[request.branch] = tx
        return tx

    def reject(self, tx: InviteServerTransaction, status: int, headers: Sequence[tuple[str, str]] = (),
               to_tag: str | None = None) -> None:
        """Answer an INVITE with a final error ``status`` (3xx–6xx), resent over UDP until its ACK (Timer G/H)."""
        data = sip.response(tx.request, tx.flow.source, status, to_tag=to_tag or sip.new_tag(), headers=headers)
        tx.send(data, final=status, expires=self.clock() + TIMER_B)
        if tx.flow.transport != "UDP":
            return
        if self._retransmitting >= MAX_RETRANSMITTING:
            # a flood of INVITEs (perhaps from spoofed addresses): answer each once, do not amplify it tenfold
            if not self._flooded:
                log.warning("SIP: %d error responses already retransmitting; further ones are sent once",
                            MAX_RETRANSMITTING)
            self._flooded = True
            return
        self._flooded = False
        self._retransmitting += 1

        async def resend() -> None:
            try:
                await retransmit(lambda: tx.flow.send(data, tx.destination), tx.acked, self.clock)
            finally:
                self._retransmitting -= 1

        self.tasks.spawn(resend(), "sip-retransmit-final")

    def accept(self, tx: InviteServerTransaction, ok: bytes, on_no_ack: Callable[[], None]) -> asyncio.Event:
        """Send a 2xx for the INVITE and resend it over UDP until the ACK (§13.3.1.4).

        Returns the event the dialog layer sets when the ACK arrives;
        ``on_no_ack`` runs when none came within 64·T1 (also over TCP).
        """
        tx.send(ok, final=200, expires=self.clock() + TIMER_B)
        acked = asyncio.Event()
        send = (lambda: tx.flow.send(ok, tx.destination)) if tx.flow.transport == "UDP" else (lambda: None)
        self.tasks.spawn(retransmit(send, acked, self.clock, on_no_ack), "sip-retransmit-2xx")
        return acked

    def ack_error(self, branch: str) -> bool:
        """An ACK for a non-2xx final response (same branch as its INVITE, §17.1.1.3): stop Timer G.

        Returns whether it matched such a transaction.
        """
        tx = self.invites.get(branch)
        if tx is None or tx.final in (None, 200):
            return False
        tx.acked.set()
        return True

    # ------------------------------------------------------------ non-INVITE server transactions
    def reply(self, request: sip.Request, flow: Flow, status: int, **kw) -> bytes:
        """Send a response to a non-INVITE request; a final one is kept for its retransmissions (Timer J)."""
        data = sip.response(request, flow.source, status, **kw)
        destination = self.destination(request, flow)
        flow.send(data, destination)
        if request.method not in ("INVITE", "ACK") and status >= 200:
            self._answered[(request.branch, request.method)] = (data, flow, destination, self.clock() + TIMER_B)
        return data

    def replay(self, request: sip.Request) -> bool:
        """A retransmitted non-INVITE request: send the same final response again; False when not seen before."""
        cached = self._answered.get((request.branch, request.method))
        if cached is None:
            return False
        cached[1].send(cached[0], cached[2])
        return True

    # ------------------------------------------------------------ non-INVITE client transactions
    def request(self, data: bytes, flow: Flow, destination: tuple[str, int], branch: str) -> None:
        """Send a request we originate (BYE); over UDP from the SIP socket, resent until a final response (Timer E/F).

        Over TCP it goes on the call's own connection, once.
        """
        if flow.transport == "TCP":
            flow.send(data)
            return
        done = asyncio.Event()
        self._client[branch] = done
        self.send_udp(data, destination)

        async def resend() -> None:
            try:
                await retransmit(lambda: self.send_udp(data, destination), done, self.clock)
            finally:
                self._client.pop(branch, None)

        self.tasks.spawn(resend(), "sip-bye")

    def on_response(self, response) -> None:
        """A response from the network: a final one ends the client transaction its Via branch names."""
        try:
            branch = Via.parse_many(response.headers.get("Via") or "")[0].parameters.get("branch")
        except (ValueError, IndexError):
            return
        done = self._client.get(branch or "")
        if done is not None and response.code >= 200:
            done.set()
