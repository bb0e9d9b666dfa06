"""`sub300 serve` drained by SIGTERM, for real: the process on 127.0.0.1 (free ports), real engines,
an aiortc WebRTC caller and a sipp phone (sub300/drain.py, sub300/cli.py `serve`).

* WebRTC, mid-reply: /readyz 503 "draining" at once, a new /offer 503 with Retry-After, the caller gets
  the rest of the reply then the goodbye (data channel ``agent_text``), the server closes the call, the
  process exits 0 within the drain timeout.
* SIP, mid-reply: a new INVITE gets 503, the agent sends BYE after the goodbye, exit 0.
* A second SIGTERM ends the call at once; a drain timeout of 0 too (no goodbye); exit 0 both.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sub300.agent.config import ServerConfig
from sub300.testing.aiortc_caller import AiortcCaller

from .server_process import ServerProcess, free_port
from .speech import compose, speak

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
GOODBYE = ServerConfig().drain_goodbye
QUESTION = "Tell me a long story about the history of Rome, please."


class Server(ServerProcess):
    """`sub300 serve` in a subprocess; its log (stdout and stderr) in ``tmp/server.log``."""

    def __init__(self, tmp: Path, **settings: str) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
        env.update({"SUB300_LLM_MAX_TOKENS": "60", **settings})
        super().__init__([sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                         port=port, env=env, cwd=ROOT, out=tmp / "server.log")

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 120.0) -> None:
        await super().ready(session, timeout)


@pytest.fixture(scope="module")
def question():
    return compose(0.3, speak(QUESTION), 1.0)


async def call_in_reply(server: Server, session: aiohttp.ClientSession, question) -> AiortcCaller:
    """A connected caller whose question is being answered (the agent's first words are out)."""
    await server.ready(session)
    caller = AiortcCaller(server.base, session)
    await caller.connect()
    caller.say(question)
    await caller.wait_for(lambda: bool(caller.onsets), 60, "the reply's first audio")
    return caller


def agent_texts(caller: AiortcCaller) -> list[str]:
    return [e["text"] for e in caller.events_of("agent_text")]


async def test_sigterm_mid_reply_plays_the_reply_then_the_goodbye_and_exits_0(tmp_path, question):
    server = Server(tmp_path, SUB300_SERVER_DRAIN_TIMEOUT_S="40")
    try:
        async with aiohttp.ClientSession() as session:
            caller = await call_in_reply(server, session, question)
            try:
                assert not caller.events_of("turn")   # mid-reply
                server.proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                while True:   # readiness goes false at once
                    async with session.get(server.base + "/readyz") as r:
                        if r.status == 503:
                            assert (await r.json())["reason"] == "draining"
                            break
                    assert time.monotonic() - t0 < 1.0, "/readyz still 200 a second after SIGTERM"
                    await asyncio.sleep(0.02)
                late = AiortcCaller(server.base, session)
                with pytest.raises(ConnectionError, match="HTTP 503"):
                    await late.connect()
                await late.vanish()
                async with session.get(server.base + "/livez") as r:
                    assert r.status == 200   # alive while it drains
                await caller.wait_for(lambda: caller.pc.connectionState in ("closed", "failed"), 45,
                                      "the server closing the call")
                status, waited = await server.exited(10)
            finally:
                await caller.vanish()
    finally:
        server.kill()
    log = server.log()
    assert status == 0 and waited < 40 + 10, log[-3000:]
    (turn,) = caller.events_of("turn")   # the turn in flight finished, its reply whole
    texts = agent_texts(caller)
    assert texts[-1] == GOODBYE and "".join(texts[:-1]).replace(" ", "") == turn["reply"].replace(" ", "")
    kinds = [e["kind"] for e in caller.events]
    assert kinds.index("turn") < len(kinds) - 1 - kinds[::-1].index("agent_text")   # goodbye after the turn
    assert "closing (agent_hangup: drain)" in log and "shutdown complete (drained)" in log


@pytest.mark.parametrize("timeout_s, signals, said", [
    ("60", 2, ("drain forced", "shutdown complete (forced)")),      # a second SIGTERM ends the rest at once
    ("0", 1, ("drain timeout", "shutdown complete (timeout)")),     # a drain timeout of 0: at once too
], ids=["second_sigterm", "timeout_0"])
async def test_a_forced_drain_ends_the_call_at_once_and_exits_0(tmp_path, question, timeout_s, signals, said):
    server = Server(tmp_path, SUB300_SERVER_DRAIN_TIMEOUT_S=timeout_s)
    try:
        async with aiohttp.ClientSession() as session:
            caller = await call_in_reply(server, session, question)
            try:
                for n in range(signals):
                    if n:
                        await asyncio.sleep(0.5)
                    server.proc.send_signal(signal.SIGTERM)
                status, waited = await server.exited(15)
            finally:
                await caller.vanish()
    finally:
        server.kill()
    log = server.log()
    assert status == 0 and waited < 15, log[-3000:]
    assert all(line in log for line in said), log[-3000:]
    assert GOODBYE not in agent_texts(caller)


@pytest.mark.skipif(__import__("shutil").which("sipp") is None, reason="sipp (sip-tester) missing")
async def test_sip_call_mid_reply_gets_the_goodbye_and_a_bye_and_a_new_invite_503(tmp_path):
    from .test_sip_support import PCMU, scenario_call, scenario_rejected, sipp, sipp_errors, ulaw_question

    ulaw, seconds = ulaw_question(tmp_path, "story", 0.5, QUESTION, 0.5)
    sip_port = free_port(socket.SOCK_DGRAM)
    server = Server(tmp_path, SUB300_SERVER_DRAIN_TIMEOUT_S="40", SUB300_SIP_ENABLED="true",
                    SUB300_SIP_HOST="127.0.0.1", SUB300_SIP_PORT=str(sip_port))
    try:
        async with aiohttp.ClientSession() as session:
            await server.ready(session)   # ready only once SIP is bound
            phone = sipp(tmp_path, scenario_call(ulaw, then="agent_bye", timeout_ms=60000),
                         ("127.0.0.1", sip_port), "phone")
            try:
                deadline = time.monotonic() + 60
                while "SIP call" not in server.log() or " answered" not in server.log():
                    assert time.monotonic() < deadline, server.log()[-3000:]
                    await asyncio.sleep(0.1)
                await asyncio.sleep(seconds + 2.5)   # the question, then the reply's first words
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = sipp(tmp_path, scenario_rejected(*PCMU, expect=503), ("127.0.0.1", sip_port), "late")
                try:
                    assert await late.wait(20) == 0, sipp_errors(tmp_path, "late") + late.tail()
                finally:
                    late.stop()
                # the phone's scenario ends with the agent's BYE, answered 200
                assert await phone.wait(50) == 0, sipp_errors(tmp_path, "phone") + phone.tail()
            finally:
                phone.stop()
            status, waited = await server.exited(15)
    finally:
        server.kill()
    log = server.log()
    assert status == 0, log[-3000:]
    assert "ending the call politely (drain)" in log and "agent hung up" in log
    assert "INVITE from 127.0.0.1 refused: draining" in log
    answered = log.index("turn 1: ")
    assert answered < log.index("agent hung up") and "shutdown complete (drained)" in log
