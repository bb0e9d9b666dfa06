"""Helpers for the SIP tests (no tests here): the service under test, an observer that records, peers run by PID,
and `EchoAgent`, the fake agent that lets protocol tests run without a model."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

from sub300.agent.audio import AudioFrame, StreamResampler
from sub300.agent.events import TurnFinished
from sub300.agent.playout import PlayoutQueue
from sub300.media.sip.call import CallSetup
from sub300.media.sip.service import start_sip_service

from .speech import compose, save, speak


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@dataclass
class CallRecord:
    events: list = field(default_factory=list)
    ended: str | None = None

    @property
    def turns(self) -> list[TurnFinished]:
        return [e for e in self.events if isinstance(e, TurnFinished)]

    def kinds(self) -> list[str]:
        return [getattr(e, "kind", "?") for e in self.events]


class RecordingObserver:
    """A CallObserver that keeps every event of every call."""

    def __init__(self) -> None:
        self.calls: dict[str, CallRecord] = {}

    def call_started(self, transport: str, call_id: str, context=None):
        assert transport == "sip"
        record = self.calls.setdefault(call_id, CallRecord())
        return record.events.append

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        assert self.calls[call_id].ended is None, "call_ended twice"
        self.calls[call_id].ended = reason

    async def wait_ended(self, n: int = 1, timeout: float = 30.0) -> list[CallRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [c for c in self.calls.values() if c.ended is not None]
            if len(done) >= n:
                return done
            await asyncio.sleep(0.05)
        raise AssertionError(f"calls did not end: {self.calls}")

    def describe(self) -> str:
        """What each call's conversation said it did (final transcripts, discards, barge-ins,
        failures, hang-ups): for a failing test's message."""
        lines = []
        for call_id, record in self.calls.items():
            for e in record.events:
                if e.kind in ("transcript", "turn_discarded", "barge_in", "turn_failed", "hangup") and \
                        getattr(e, "final", True):
                    lines.append(f"{call_id}: {e}")
        return "\n".join(lines)


class EchoAgent:
    """A fake agent (no model) for SIP protocol tests: plays the caller's audio straight back, keeps the digits.

    On hold it echoes nothing and plays nothing (like `Conversation.hold`); ``holds`` records
    "hold" / "continue" / "drop" in order.

    Satisfies `sub300.media.sip.call.CallAgent`; `echo_calls` is its call factory.
    """

    def __init__(self, setup: CallSetup) -> None:
        self.playout = PlayoutQueue(setup.sample_rate, setup.clock)
        self.listeners: list = []
        self.digits: list[str] = []
        self.closed = False
        self.held = False
        self.holds: list[str] = []
        self._down = StreamResampler(16000, setup.sample_rate)
        self._turn = 0

    def push_frame(self, frame: AudioFrame) -> None:
        pcm = self._down.process(frame.samples)
        if len(pcm) and pcm.any() and not self.held:
            self.playout.push(pcm, turn=self._turn)

    def push_dtmf(self, digit: str) -> None:
        self.digits.append(digit)

    def hold(self) -> None:
        self.held = True
        self.holds.append("hold")
        self.playout.hold()

    def unhold(self, drop_rest: bool) -> None:
        self.held = False
        self.holds.append("drop" if drop_rest else "continue")
        if drop_rest:
            self.playout.flush()
        self.playout.unhold()

    async def aclose(self) -> None:
        self.playout.flush()
        self.closed = True


def echo_calls(setup: CallSetup) -> EchoAgent:
    """The call factory of protocol tests: an `EchoAgent` per call."""
    return EchoAgent(setup)


@contextlib.asynccontextmanager
async def sip_service(config, engines=None, **kw):
    """A SIP service on a free port of 127.0.0.1; ``sip={...}`` overrides config.sip keys.

    Pass ``engines`` for real conversations, or ``call_factory=echo_calls`` (no engines) for protocol tests.
    Yields (service, RecordingObserver).
    """
    config = copy.deepcopy(config)
    config.sip.port = 0
    config.sip.host = "127.0.0.1"
    for key, value in kw.pop("sip", {}).items():
        setattr(config.sip, key, value)
    observer = RecordingObserver()
    service = await start_sip_service(config, engines, observer, **kw)
    try:
        yield service, observer
    finally:
        await service.close()


def ulaw_question(tmp, name: str, *parts) -> tuple[str, float]:
    """Spoken parts (text or seconds of silence) → raw μ-law file for sipp; returns (path, seconds)."""
    pcm = compose(*[speak(p) if isinstance(p, str) else p for p in parts])
    wav = save(tmp / f"{name}.wav", pcm)
    out = tmp / f"{name}.ulaw"
    # -D: no dither.  sox dithers by default when it resamples, even digital silence (about a quarter of a
    # silent second's bytes came out 0xFE/0x7E, ±8), so "silence" was random noise that a fake VAD took for
    # speech in some runs (test_call_limits' silent caller was answered in one CI run)
    subprocess.run(["sox", "-D", str(wav), "-r", "8000", "-c", "1", "-t", "ul", str(out)], check=True)
    return str(out), len(pcm) / 16000


class Peer:
    """An outside program started by a test and stopped by its PID (never by name)."""

    def __init__(self, argv: list[str], cwd: str | None = None, log_path: str | None = None):
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (open until stop())
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.proc.args[0]} did not finish in {timeout} s; log: {self.tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)   # its own session: only what it started
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def tail(self, n: int = 3000) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-n:]


def sipp(tmp, scenario: str, target: tuple[str, int], name: str = "sipp", *extra: str) -> Peer:
    path = tmp / f"{name}.xml"
    path.write_text(scenario)
    argv = ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", "0", "-m", "1",
            "-nostdin", "-timeout", "60s", "-timeout_error", "-trace_err",
            "-error_file", str(tmp / f"{name}_errors.log"), *extra, f"{target[0]}:{target[1]}"]
    return Peer(argv, cwd=str(tmp), log_path=str(tmp / f"{name}.out"))


def sipp_errors(tmp, name: str = "sipp") -> str:
    path = tmp / f"{name}_errors.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


# ------------------------------------------------------------------ sipp scenarios
_HEAD = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="{name}">\n'
_INVITE = """  <send retrans="500">
    <![CDATA[
      INVITE sip:agent@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [auto_media_port] RTP/AVP {formats}
{rtpmaps}
    ]]>
  </send>
"""
_ACK = """  <send>
    <![CDATA[
      ACK sip:agent@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""
_ACK_2XX = _ACK.replace("[last_Via:]", "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport") \
               .replace("ACK sip:agent@[remote_ip]:[remote_port]", "ACK [next_url]")
_BYE = """  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
"""
_ANSWER_BYE = """  <recv request="BYE" timeout="{timeout_ms}"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
"""
PCMU = ("0 101", "      a=rtpmap:0 PCMU/8000\n      a=rtpmap:101 telephone-event/8000\n      a=fmtp:101 0-15")


def scenario_call(ulaw: str, *, then: str = "agent_bye", bye_after_ms: int = 0, timeout_ms: int = 45000,
                  goodbye: str | None = None) -> str:
    """INVITE → 200 → ACK → stream `ulaw` → then:

    agent_bye: wait for the agent's BYE (with `goodbye`: first wait for a poke, then stream `goodbye`,
    so the goodbye never barges into the first answer); bye_on_info: BYE when poked; else BYE after
    `bye_after_ms`.
    """
    out = _HEAD.format(name="call") + _INVITE.format(formats=PCMU[0], rtpmaps=PCMU[1])
    out += ('  <recv response="100" optional="true"/>\n  <recv response="180" optional="true"/>\n'
            '  <recv response="200" rtd="true" rrs="true"/>\n')
    out += _ACK_2XX
    out += f'  <nop><action><exec rtp_stream="{ulaw},1,0"/></action></nop>\n'
    if then == "agent_bye":
        if goodbye is not None:
            out += _ANSWER_BYE.replace("BYE", "INFO").format(timeout_ms=timeout_ms)
            out += f'  <nop><action><exec rtp_stream="{goodbye},1,0"/></action></nop>\n'
        out += _ANSWER_BYE.format(timeout_ms=timeout_ms)
    elif then == "bye_on_info":   # the test pokes sipp with an INFO when it wants the caller to hang up
        out += _ANSWER_BYE.replace("BYE", "INFO").format(timeout_ms=timeout_ms) + _BYE
    else:
        out += f'  <pause milliseconds="{bye_after_ms}"/>\n' + _BYE
    return out + "</scenario>\n"


def poke(dialog, port: int) -> bytes:
    """An INFO that looks like it comes from the agent, to wake a `bye_on_info` scenario."""
    invite = dialog.invite
    return (f"INFO {dialog.remote_target} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-poke\r\n"
            f"From: {invite.to};tag={dialog.local_tag}\r\nTo: {invite.from_}\r\nCall-ID: {invite.call_id}\r\n"
            "CSeq: 9 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


async def poke_when(service, observer, condition, timeout: float = 60.0) -> None:
    """Wait until the (only) live call's events satisfy `condition`, then poke sipp (see `poke`)."""
    import socket

    from sipmessage import URI

    records: list[CallRecord] = []
    for _ in range(int(timeout / 0.05)):
        records = [r for r in observer.calls.values() if r.ended is None]
        if len(records) == 1 and condition(records[0].events) and len(service.uas.dialogs) == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"condition not met: {[r.kinds() for r in records]}")
    (dialog,) = service.uas.dialogs.values()
    target = URI.parse(dialog.remote_target)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(poke(dialog, s.getsockname()[1]), (target.host, target.port or 5060))


def scenario_cancel(cancel_after_ms: int = 300) -> str:
    out = _HEAD.format(name="cancel") + _INVITE.format(formats=PCMU[0], rtpmaps=PCMU[1])
    out += '  <recv response="100" optional="true"/>\n  <recv response="180"/>\n'
    out += f'  <pause milliseconds="{cancel_after_ms}"/>\n'
    out += """  <send retrans="500">
    <![CDATA[
      CANCEL sip:agent@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
"""
    return out + _ACK + "</scenario>\n"


def scenario_rejected(formats: str, rtpmaps: str, expect: int) -> str:
    out = _HEAD.format(name="rejected") + _INVITE.format(formats=formats, rtpmaps=rtpmaps)
    out += f'  <recv response="100" optional="true"/>\n  <recv response="{expect}"/>\n'
    return out + _ACK + "</scenario>\n"


_REINVITE = """  <send retrans="500">
    <![CDATA[
      INVITE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} INVITE
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 {version} IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] {address}
      t=0 0
      m=audio [auto_media_port] RTP/AVP {formats}
{rtpmaps}
      a={direction}
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="200"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      [routes]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""


def scenario_hold(ulaw: str, *, hold_ms: int | None = 3000, resume_ms: int = 6000, hold: str = "sendonly",
                  timeout_ms: int = 60000) -> str:
    """INVITE → 200 → ACK → stream `ulaw`; at `hold_ms` a re-INVITE that holds (`hold`: sendonly, inactive,
    or "0.0.0.0" for the RFC 2543 style), at `resume_ms` one with sendrecv (both from the stream's start);
    then BYE when poked (see `poke`).  With ``hold_ms=None`` the hold comes when poked, and the resume
    ``resume_ms`` after it."""
    out = _HEAD.format(name="hold") + _INVITE.format(formats=PCMU[0], rtpmaps=PCMU[1])
    out += ('  <recv response="100" optional="true"/>\n  <recv response="180" optional="true"/>\n'
            '  <recv response="200" rtd="true" rrs="true"/>\n')
    out += _ACK_2XX
    out += f'  <nop><action><exec rtp_stream="{ulaw},1,0"/></action></nop>\n'
    held = ("sendrecv", "0.0.0.0") if hold == "0.0.0.0" else (hold, "[media_ip]")
    if hold_ms is None:
        out += _ANSWER_BYE.replace("BYE", "INFO").format(timeout_ms=timeout_ms)
    else:
        out += f'  <pause milliseconds="{hold_ms}"/>\n'
    out += _REINVITE.format(cseq=2, version=2353687638, address=held[1], formats=PCMU[0], rtpmaps=PCMU[1],
                            direction=held[0])
    out += f'  <pause milliseconds="{resume_ms - (hold_ms or 0)}"/>\n'
    out += _REINVITE.format(cseq=3, version=2353687639, address="[media_ip]", formats=PCMU[0], rtpmaps=PCMU[1],
                            direction="sendrecv")
    out += _ANSWER_BYE.replace("BYE", "INFO").format(timeout_ms=timeout_ms)
    return out + _BYE.replace("CSeq: 2 BYE", "CSeq: 4 BYE") + "</scenario>\n"
