"""/ws/pcm: a real WebSocket client sending 16-bit PCM at the query string's rate, on fake engines, virtual time."""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import numpy as np
import pytest

from sub300.agent.audio import StreamResampler
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech

from .test_ws_twilio import App, no_call_left

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")


class PcmClient:
    """A custom client: sends its microphone (20 ms binary frames, real time), keeps what comes back."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, rate: int) -> None:
        self.ws, self.rate = ws, rate
        self.audio: list[np.ndarray] = []
        self.frame_bytes: set[int] = set()
        self.texts: list[dict] = []
        self.closed: tuple[int | None, str] | None = None
        self.reader = asyncio.ensure_future(self._read())

    async def speak(self, pcm16k: np.ndarray) -> None:
        pcm = StreamResampler(16000, self.rate).process(pcm16k)
        step = self.rate // 50
        for i in range(0, len(pcm), step):
            if self.ws.closed:
                return
            await self.ws.send_bytes(pcm[i:i + step].astype("<i2").tobytes())
            await asyncio.sleep(0.02)

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.frame_bytes.add(len(msg.data))
                self.audio.append(np.frombuffer(msg.data, "<i2"))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self.texts.append(json.loads(msg.data))
            else:
                self.closed = (self.ws.close_code, msg.extra if isinstance(msg.extra, str) else "")
                return

    def kinds(self) -> list[str]:
        return [t.get("kind") for t in self.texts]


@pytest.mark.looptime
@pytest.mark.parametrize("rate", [8000, 16000, 48000])
async def test_round_trip_at_the_query_strings_rate(config, rate):
    engines = fake_engines(stt=FakeStt("Hello there?"), llm=FakeLlm(["Hi, how can I help?"]),
                           tts=FakeTts(ms_per_piece=300))
    async with App(config, engines) as app:
        client = PcmClient(await app.session.ws_connect(app.url(f"/ws/pcm?rate={rate}")), rate)
        await client.speak(speech(0.4))
        await client.speak(np.zeros(int(16000 * 1.1), np.int16))
        health = await (await app.session.get(app.url("/healthz"))).json()
        assert [(c["transport"], c["call_id"]) for c in health["calls"]] == [("pcm", client.texts[0]["call_id"])]
        await client.ws.send_str(json.dumps({"type": "hangup"}))
        await asyncio.wait_for(client.reader, 5)
        await no_call_left(app)
    assert client.closed == (1000, "hangup")
    assert client.texts[0]["kind"] == "hello" and client.texts[0]["rate"] == rate
    assert {"state", "transcript", "turn"} <= set(client.kinds())
    finished = [t for t in client.texts if t["kind"] == "turn"][0]
    assert finished["ledger"]["voice_to_voice_ms"] > 0
    assert client.frame_bytes == {rate // 50 * 2}             # 20 ms frames of 16-bit samples
    agent = np.concatenate(client.audio)
    assert np.abs(agent).max() > 1000                          # the agent's tone, at the client's rate
    assert app.recorder.started[0][0] == "pcm" and app.recorder.ended[0][2] == "hangup"


@pytest.mark.looptime
async def test_a_bad_rate_is_refused_with_a_clear_reason(config):
    async with App(config, fake_engines()) as app:
        for query in ("rate=7999", "rate=48001", "rate=11025", "rate=abc"):
            ws = await app.session.ws_connect(app.url(f"/ws/pcm?{query}"))
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008, query
            assert "rate must be an integer from 8000 to 48000 Hz, a multiple of 50" in msg.extra
    assert not app.recorder.started


@pytest.mark.looptime
async def test_a_second_of_48_khz_in_one_frame_is_taken_and_a_bigger_message_closes_1009(config):
    async with App(config, fake_engines()) as app:
        client = PcmClient(await app.session.ws_connect(app.url("/ws/pcm?rate=48000")), 48000)
        await client.ws.send_bytes(np.zeros(48000, "<i2").tobytes())    # 96 000 bytes: the documented maximum
        await client.ws.send_str(json.dumps({"type": "hangup"}))
        await asyncio.wait_for(client.reader, 5)
        assert client.closed == (1000, "hangup")
        ws = await app.session.ws_connect(app.url("/ws/pcm?rate=48000"))
        await ws.receive(timeout=5)                                      # hello
        await ws.send_bytes(bytes(200_000))
        while (await ws.receive(timeout=5)).type != aiohttp.WSMsgType.CLOSE:
            pass
        assert ws.close_code == 1009
        await no_call_left(app)


@pytest.mark.looptime
async def test_barge_in_sends_clear_bad_frames_and_floods_are_survived(config, caplog):
    llm = FakeLlm(lambda messages: ["Once upon a time there were three bears in a wood."]
                  if len(messages) <= 2 else ["Sure."])
    engines = fake_engines(stt=FakeStt("Tell me a story"), llm=llm, tts=FakeTts(ms_per_piece=3000))
    async with App(config, engines) as app:
        client = PcmClient(await app.session.ws_connect(app.url("/ws/pcm?rate=16000")), 16000)
        with caplog.at_level(logging.INFO):
            await client.ws.send_bytes(b"\x01\x02\x03")                     # odd length
            await client.ws.send_str("{not json")
            await client.ws.send_str(json.dumps({"type": "dtmf", "digit": "x"}))
            await client.ws.send_bytes(np.ones(16000 * 3, "<i2").tobytes()[: 2 * 16000])   # 1 s at once: allowed
            await client.ws.send_bytes(np.ones(16000, "<i2").tobytes())      # beyond real time + 1 s: dropped
            await client.speak(np.zeros(16000, np.int16))
            await client.speak(speech(0.6))
            await client.speak(np.zeros(int(16000 * 1.2), np.int16))         # the agent speaks
            await client.speak(speech(0.8, seed=1))                          # the caller barges in
            await client.speak(np.zeros(16000, np.int16))
            await client.ws.close()
            await asyncio.wait_for(client.reader, 5)
            await no_call_left(app)
    assert "clear" in client.kinds()
    assert "barge_in" in client.kinds()
    text = caplog.text
    for what in ("whole 16-bit samples", "a text frame must be JSON", "dtmf.digit", "faster than real time"):
        assert what in text, what
    # "connection lost" when the test server cancels the handler as the client's TCP connection closes
    assert app.recorder.ended[0][2] in ("caller closed", "connection lost")
    heard = [m for m in llm.requests[-1] if m["role"] == "assistant"][0]["content"]
    assert heard != "Once upon a time there were three bears in a wood."   # cut: only what was sent counts
