"""The README's examples (scripts/examples/*.py) run as written: each one in a subprocess on free ports, its
LLM a FAKE OpenAI-compatible API that streams tool calls (sub300/testing/fake_openai_tools.py).

weather_agent.py: /readyz 200; an aiortc caller asks for the weather and hears the tool's result (the reply,
and the example's own ``turn_ended`` hook line on stdout); SIP answers OPTIONS; /ws/pcm takes a stream;
SIGTERM drains and the process exits 0.  The README shows the file exactly.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from sub300.testing.aiortc_caller import AiortcCaller
from sub300.testing.fake_openai_tools import FakeToolsApi

from .server_process import ServerProcess, free_port
from .speech import compose, speak

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "scripts" / "examples").glob("*.py"))


def sip_options(port: int) -> bytes:
    return (f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-ex;rport\r\n"
            "From: <sip:t@x>;tag=1\r\nTo: <sip:agent@x>\r\nCall-ID: example-options\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


class Example(ServerProcess):
    """``python EXAMPLE`` as a user runs it, with the ports, the records and the LLM endpoint in its environment."""

    def __init__(self, path: Path, tmp: Path, llm_url: str) -> None:
        port, self.sip_port = free_port(), free_port(socket.SOCK_DGRAM)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
        env.update(SUB300_SERVER_PORT=str(port), SUB300_SIP_PORT=str(self.sip_port),
                   SUB300_LLM_BASE_URL=llm_url, SUB300_RECORDS_URL=f"sqlite:///{tmp}/records.db")
        super().__init__([sys.executable, str(path)], port=port, env=env, cwd=tmp, out=tmp / "stdout.txt",
                         err=tmp / "stderr.txt")

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 180.0) -> None:
        await super().ready(session, timeout)

    async def terminated(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        status, _waited = await self.exited(timeout)
        return status


async def sip_answers_options(port: int) -> str:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not answered.done():
                answered.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(sip_options(transport.get_extra_info("sockname")[1]))
        return (await asyncio.wait_for(answered, 5.0)).decode(errors="replace").split("\r\n", 1)[0]
    finally:
        transport.close()


def test_every_example_is_tested():
    assert [p.name for p in EXAMPLES] == ["weather_agent.py"]


def test_the_readme_shows_the_weather_agent_exactly():
    code = (ROOT / "scripts" / "examples" / "weather_agent.py").read_text()
    assert f"```python\n{code}```" in (ROOT / "README.md").read_text(), \
        "README.md must show scripts/examples/weather_agent.py exactly, in a ```python block"


async def test_weather_agent_answers_with_its_tool_over_webrtc_sip_and_websocket(tmp_path):
    question = compose(0.3, speak("What is the weather in Paris?"), 1.0)
    async with FakeToolsApi() as api, aiohttp.ClientSession() as session:
        example = Example(ROOT / "scripts" / "examples" / "weather_agent.py", tmp_path, api.base_url)
        try:
            await example.ready(session)
            assert await sip_answers_options(example.sip_port) == "SIP/2.0 200 OK"
            async with session.ws_connect(example.base + "/ws/pcm?rate=16000") as ws:   # the WebSocket transport
                await ws.send_bytes(bytes(640))
                await ws.close()
            caller = AiortcCaller(example.base, session)
            await caller.connect()
            try:
                caller.say(question)
                (turn,) = await caller.wait_for_turns(1, 90)
            finally:
                await caller.hang_up()
            assert "Paris" in turn["transcript"]
            assert "Sunny and 22 degrees in Paris" in turn["reply"]       # the tool's result, spoken
            assert any(m.get("role") == "tool" for m in api.requests[-1]["messages"])
            assert await example.terminated() == 0, example.tail()
        finally:
            example.kill()
    printed = example.out.read_text()
    assert f"-> {turn['reply']!r} in " in printed, printed
