"""The model node's routes on named fakes: /v1/audio/transcriptions, /v1/audio/speech (web/audio_api.py),
Server-Timing and X-Sub300-Urgency on them and on /v1/chat/completions, roles, auth scope, drain, usage.

The app is `build_app` on fake engines (sub300/testing/fakes.py), served on 127.0.0.1 by an AppRunner
as `sub300 serve` runs it (not aiohttp's TestServer, which cancels a handler whose client leaves: the
server does not, so the speech route watches its connection itself); the engines' delays are a few
ms of real time.
"""
from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from sub300.agent.auth.keys import new_key
from sub300.agent.auth.memory_store import MemoryKeyStore
from sub300.agent.usage import STT_AUDIO_S, TTS_CHARS
from sub300.models.protocols import EndpointUnreachable, ModelError
from sub300.models.scheduling import Urgency
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, tone
from sub300.web.audio_api import SPEECH_SAMPLE_RATE, decode_audio, wav_stream_header
from sub300.web.auth import add_auth_routes
from sub300.web.openai_api import MODEL_USAGE_KEY
from sub300.web.server import ADMISSION_KEY, MODEL_REQUESTS_KEY, build_app

TIMING = re.compile(r"^queue;dur=(\d+\.\d), work;dur=(\d+\.\d)$")


def wav_bytes(seconds: float, rate: int = 8000, hz: float = 300.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def timing(headers) -> tuple[float, float]:
    match = TIMING.match(headers.get("Server-Timing", ""))
    assert match, headers.get("Server-Timing")
    return float(match[1]), float(match[2])


class Sink:
    def __init__(self) -> None:
        self.requests: list[tuple] = []

    def model_request(self, key_id, source, route, usage, status) -> None:
        self.requests.append((route, dict(usage), status))


class Node:
    """`build_app` for ``role`` on ``engines`` (fakes by default), served; ``post_*`` helpers."""

    def __init__(self, config, *, role: str = "model", engines=None, auth: bool = False, **server) -> None:
        config = copy.deepcopy(config)
        config.server.role = role
        for key, value in server.items():
            setattr(config.server, key, value)
        self.engines = engines or fake_engines(stt=FakeStt("hello there", delay_s=0.005),
                                               tts=FakeTts(delay_s=0.005, ms_per_piece=500))
        self.app = build_app(config, self.engines)
        self.sink = Sink()
        self.app[MODEL_USAGE_KEY] = self.sink
        self.keys = {}
        if auth:
            store = self.store = MemoryKeyStore()
            for scopes in ("calls", "model"):
                key, secret = new_key(scopes, scopes)
                store.add_key(key)
                self.keys[scopes] = secret
            add_auth_routes(self.app, config, store, enabled=True)
        self.runner = web.AppRunner(self.app, shutdown_timeout=1.0)   # as `sub300 serve` runs it

    async def __aenter__(self) -> Node:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.runner.cleanup()

    def url(self, path: str) -> str:
        return self.base + path

    async def transcribe(self, data: bytes | None = None, headers=None, **fields) -> tuple[int, dict, bytes]:
        form = aiohttp.FormData()
        if data is not None:
            form.add_field("file", data, filename="clip.wav", content_type="audio/wav")
        for name, value in {"model": "whisper-1", **fields}.items():
            form.add_field(name, str(value))
        async with self.session.post(self.url("/v1/audio/transcriptions"), data=form, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    async def speak(self, body, headers=None) -> tuple[int, dict, bytes]:
        async with self.session.post(self.url("/v1/audio/speech"), json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


# ------------------------------------------------------------------ transcriptions
async def test_a_transcription_in_each_format_with_server_timing_and_the_urgency_on_its_ticket(config):
    async with Node(config) as node:
        status, headers, body = await node.transcribe(wav_bytes(0.5), headers={"X-Sub300-Urgency": "speculative"})
        assert status == 200 and json.loads(body) == {"text": "hello there"}
        queue, work = timing(headers)
        assert queue >= 0 and work >= 4.0   # the fake's 5 ms is work
        assert node.engines.stt.tickets[-1].urgency == Urgency.SPECULATIVE
        assert node.engines.stt.calls[-1][1] == pytest.approx(0.5, abs=0.01)   # 8 kHz resampled: 0.5 s at 16 kHz

        status, headers, body = await node.transcribe(wav_bytes(0.5), response_format="text")
        assert status == 200 and body == b"hello there" and headers["Content-Type"].startswith("text/plain")
        assert node.engines.stt.tickets[-1].urgency == Urgency.COMMITTED   # no header: committed

        status, _, body = await node.transcribe(wav_bytes(0.5), response_format="verbose_json", language="en")
        doc = json.loads(body)
        assert status == 200 and doc["text"] == "hello there" and doc["duration"] == pytest.approx(0.5, abs=0.01)
        assert doc["segments"][0]["end"] == doc["duration"] and "no_speech_prob" in doc["segments"][0]
        assert node.sink.requests[0] == ("/v1/audio/transcriptions", {STT_AUDIO_S: pytest.approx(0.5, abs=0.01)}, 200)


def test_decode_audio_gives_float32_16k_and_refuses_what_is_not_audio():
    audio = decode_audio(wav_bytes(0.25, rate=44100), max_seconds=10)
    assert audio.dtype == np.float32 and len(audio) == pytest.approx(4000, abs=40) and np.abs(audio).max() < 1.0
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_audio(b"this is not audio at all" * 10, max_seconds=10)
    with pytest.raises(ValueError, match="longer than"):
        decode_audio(wav_bytes(2.0), max_seconds=1)


@pytest.mark.parametrize(("data", "fields", "headers", "status", "message"), [
    (None, {}, None, 400, "'file' is required"),
    (b"", {}, None, 400, "empty"),
    (b"RIFF nonsense" * 20, {}, None, 400, "cannot be decoded"),
    (wav_bytes(0.0), {}, None, 400, "no audio"),
    ("ok", {"response_format": "srt"}, None, 400, "supported: json, text, verbose_json"),
    ("ok", {"language": "fr"}, None, 400, "transcribes 'en' only"),
    ("ok", {"temperature": "3"}, None, 400, "temperature"),
    ("ok", {}, {"X-Sub300-Urgency": "urgent"}, 400, "X-Sub300-Urgency must be one of"),
    (bytes(300_000), {}, None, 413, "limit of"),
])
async def test_transcription_errors_are_openai_shaped(config, data, fields, headers, status, message):
    async with Node(config, audio_max_upload_bytes=200_000) as node:
        got, _, body = await node.transcribe(wav_bytes(0.2) if data == "ok" else data, headers=headers, **fields)
        assert got == status, body
        error = json.loads(body)["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
        assert node.engines.stt.calls == []   # refused before the engine


@pytest.mark.parametrize(("error", "status"), [(ModelError("Whisper inference failed: boom"), 500),
                                               (EndpointUnreachable("endpoint refused"), 502)])
async def test_an_engine_failure_is_a_5xx_with_the_engines_sentence(config, error, status):
    engines = fake_engines(stt=FakeStt("x", delay_s=0.001, error=error))
    async with Node(config, engines=engines) as node:
        got, _, body = await node.transcribe(wav_bytes(0.2))
        assert got == status and "boom" in body.decode() or "refused" in body.decode()
        assert "Traceback" not in body.decode()


# ------------------------------------------------------------------ speech
async def test_speech_streams_24k_pcm_or_a_streaming_wav_with_server_timing(config):
    async with Node(config) as node:
        status, headers, body = await node.speak({"model": "tts-1", "input": "Hello.", "voice": "alloy",
                                                  "response_format": "pcm"}, headers={"X-Sub300-Urgency": "slack"})
        assert status == 200 and headers["X-Sample-Rate"] == str(SPEECH_SAMPLE_RATE) == "24000"
        assert headers.get("Transfer-Encoding") == "chunked"
        assert len(body) // 2 == pytest.approx(12_000, abs=200)   # the fake's 500 ms at 16 kHz, now 24 kHz
        assert timing(headers)[1] >= 4.0
        assert node.engines.tts.tickets[-1].urgency == Urgency.SLACK and node.engines.tts.pieces == ["Hello."]

        status, headers, body = await node.speak({"input": "Hi.", "response_format": "wav"})
        assert status == 200 and headers["Content-Type"] == "audio/wav"
        assert body[:44] == wav_stream_header(24_000) and body[4:8] == b"\xff\xff\xff\xff"
        assert struct.unpack("<I", body[24:28])[0] == 24_000 and len(body) - 44 == pytest.approx(24_000, abs=400)
        assert ("/v1/audio/speech", {TTS_CHARS: 3.0}, 200) in node.sink.requests


@pytest.mark.parametrize(("body", "message"), [
    ({"input": "Hi.", "response_format": "mp3"}, "supported: pcm, wav"),
    ({"input": "Hi.", "speed": 1.5}, "speed 1.0"),
    ({"input": "  "}, "'input' is required"),
    ({"model": "tts-1"}, "'input' is required"),
    ({"input": "x" * 101}, "at most 100"),
    ({"input": "Hi.", "stream_format": "sse"}, "stream_format"),
])
async def test_speech_errors(config, body, message):
    async with Node(config, speech_max_chars=100) as node:
        status, _, raw = await node.speak(body)
        assert status == 400 and message in json.loads(raw)["error"]["message"]
        assert node.engines.tts.pieces == []


class DrippingTts:
    """A synthesis of ``chunks`` 10 ms chunks at 24 kHz (none resampled), one every ``every_s`` from the start;
    ``closed_after``: the chunks it had yielded when it was stopped."""

    name = "dripping"
    sample_rate = 24_000

    def __init__(self, chunks: int = 500, every_s: float = 0.01, fail_after: int | None = None) -> None:
        self.chunks, self.every_s, self.fail_after = chunks, every_s, fail_after
        self.sent = 0
        self.closed_after: int | None = None

    def synthesize(self, text):
        raise AssertionError("the route must use synthesize_async")

    async def synthesize_async(self, text, *, ticket=None):
        if ticket is not None:
            ticket.mark_started()
        try:
            for _ in range(self.chunks):
                if self.fail_after is not None and self.sent == self.fail_after:
                    raise ModelError("Piper failed: out of voice")
                self.sent += 1
                yield tone(10, self.sample_rate)
                await asyncio.sleep(self.every_s)
        finally:
            self.closed_after = self.sent


async def test_a_client_that_disconnects_stops_the_synthesis_at_once(config):
    tts = DrippingTts(chunks=50, every_s=0.3)   # the engine is between chunks when the client goes
    async with Node(config, engines=fake_engines(tts=tts)) as node:
        response = await node.session.post(node.url("/v1/audio/speech"), json={"input": "A long story.",
                                                                                "response_format": "pcm"})
        assert response.status == 200
        await response.content.readexactly(240 * 2)   # the first chunk: 10 ms at 24 kHz
        response.close()   # the connection goes
        loop = asyncio.get_running_loop()
        gone, sent = loop.time(), tts.sent
        while tts.closed_after is None and loop.time() - gone < 2.0:
            await asyncio.sleep(0.005)
        assert tts.closed_after == sent == 1, (tts.closed_after, sent)   # stopped before its next chunk,
        assert loop.time() - gone < 0.15                                  # at once, not at the next write
        await asyncio.sleep(0.01)
        assert node.app[MODEL_REQUESTS_KEY].active == 0


async def test_a_synthesis_that_fails_mid_stream_truncates_the_body(config):
    async with Node(config, engines=fake_engines(tts=DrippingTts(every_s=0.001, fail_after=3))) as node:
        with pytest.raises(aiohttp.ClientPayloadError):
            await node.speak({"input": "Hi.", "response_format": "pcm"})


# ------------------------------------------------------------------ chat completions, roles, auth, drain
async def test_chat_completions_carry_server_timing_and_take_the_urgency(config):
    llm = FakeLlm(["Paris", " is", " nice."], first_token_s=0.005, per_token_s=0.001)
    async with Node(config, engines=fake_engines(llm=llm)) as node:
        for stream in (False, True):
            async with node.session.post(node.url("/v1/chat/completions"), headers={"X-Sub300-Urgency": "slack"},
                                         json={"messages": [{"role": "user", "content": "Hi"}],
                                               "stream": stream}) as r:
                assert r.status == 200
                await r.read()
                assert timing(r.headers)[1] >= 4.0
            assert llm.tickets[-1] is not None and llm.tickets[-1].urgency == Urgency.SLACK
        async with node.session.post(node.url("/v1/chat/completions"), headers={"X-Sub300-Urgency": "now"},
                                     json={"messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status == 400


async def test_roles_model_serves_no_calls_media_serves_no_models(config):
    async with Node(config, role="model") as node:
        for method, path in (("GET", "/"), ("POST", "/offer"), ("GET", "/webrtc/config"), ("GET", "/static/app.js")):
            async with node.session.request(method, node.url(path)) as r:
                assert r.status == 404, path
        for path in ("/livez", "/readyz", "/metrics", "/v1/models"):
            async with node.session.get(node.url(path)) as r:
                assert r.status == 200, path
    async with Node(config, role="media") as node:
        status, _, _ = await node.speak({"input": "Hi."})
        assert status == 404
        async with node.session.get(node.url("/")) as r:
            assert r.status == 200
    async with Node(config, role="all") as node:
        assert (await node.speak({"input": "Hi."}))[0] == 200


async def test_the_audio_routes_need_the_model_scope(config):
    async with Node(config, auth=True) as node:
        assert (await node.speak({"input": "Hi."}))[0] == 401
        bearer = {"Authorization": f"Bearer {node.keys['calls']}"}
        assert (await node.speak({"input": "Hi."}, headers=bearer))[0] == 403
        assert (await node.transcribe(wav_bytes(0.2), headers=bearer))[0] == 403
        bearer = {"Authorization": f"Bearer {node.keys['model']}"}
        assert (await node.speak({"input": "Hi."}, headers=bearer))[0] == 200
        assert (await node.transcribe(wav_bytes(0.2), headers=bearer))[0] == 200


async def test_a_draining_node_refuses_new_model_requests_with_retry_after(config):
    async with Node(config) as node:
        node.app[ADMISSION_KEY].drain()
        for status, headers, body in (await node.speak({"input": "Hi."}), await node.transcribe(wav_bytes(0.2))):
            assert status == 503 and headers["Retry-After"] == "1" and json.loads(body)["error"]["code"] == "draining"
        assert node.engines.tts.pieces == [] and node.engines.stt.calls == []


async def test_an_urgency_change_reaches_the_running_requests_ticket_for_its_own_key_only(config):
    """POST /v1/requests/{id}/urgency: the running request's ticket takes the new class; another key, an
    unknown id, a finished one get 404 (``request_finished`` for its own key: its last bytes may still be on their
    way); the id is answered back; a malformed or reused id is refused."""
    release = asyncio.Event()

    class HeldLlm(FakeLlm):     # the request runs until the test releases it
        async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None, usage=None):
            self.tickets.append(ticket)
            ticket.mark_started()
            yield "One"
            await release.wait()
            yield " two."

    llm = HeldLlm()
    async with Node(config, auth=True, engines=fake_engines(llm=llm)) as node:
        other, other_secret = new_key("other", "model")
        node.store.add_key(other)
        mine = {"Authorization": f"Bearer {node.keys['model']}"}
        theirs = {"Authorization": f"Bearer {other_secret}"}
        rid = "r" * 22

        codes = []

        async def change(request_id: str, urgency: str, headers) -> int:
            async with node.session.post(node.url(f"/v1/requests/{request_id}/urgency"), headers=headers,
                                         json={"urgency": urgency}) as r:
                codes.append((await r.json())["error"]["code"] if r.status != 200 else None)
                return r.status

        async with node.session.post(node.url("/v1/chat/completions"), json={
                "messages": [{"role": "user", "content": "Hi"}], "stream": True},
                headers={**mine, "X-Sub300-Urgency": "speculative", "X-Sub300-Request-Id": rid}) as r:
            assert r.status == 200 and r.headers["X-Sub300-Request-Id"] == rid
            await r.content.readline()                  # streaming: the request is in flight
            ticket = llm.tickets[-1]
            assert ticket is not None and ticket.urgency == Urgency.SPECULATIVE
            assert await change(rid, "committed", theirs) == 404 and ticket.urgency == Urgency.SPECULATIVE
            assert await change("u" * 22, "committed", mine) == 404
            assert await change(rid, "urgent", mine) == 400
            async with node.session.post(node.url("/v1/chat/completions"), headers={**mine, "X-Sub300-Request-Id": rid},
                                         json={"messages": [{"role": "user", "content": "Hi"}]}) as again:
                assert again.status == 409                # one id, one request
            assert await change(rid, "committed", mine) == 200 and ticket.urgency == Urgency.COMMITTED
            release.set()
            await r.read()
        assert await change(rid, "slack", theirs) == 404 and codes[-1] == "not_found"
        assert await change(rid, "slack", mine) == 404 and codes[-1] == "request_finished"   # its own key learns it
        bad = {**mine, "X-Sub300-Request-Id": "short"}
        assert (await node.speak({"input": "Hi."}, headers=bad))[0] == 400


class PinningLlm(FakeLlm):
    """A fake LLM with the embedded model's static-prompt cache: at most ``slots`` prompts, never evicted."""

    def __init__(self, *args, slots: int = 4, **kw) -> None:
        super().__init__(*args, **kw)
        self.slots, self.pinned, self.attempts = slots, [], 0

    def pin_system_prompt(self, system_prompt: str) -> bool:
        self.attempts += 1
        if system_prompt not in self.pinned and len(self.pinned) >= self.slots:
            return False
        if system_prompt not in self.pinned:
            self.pinned.append(system_prompt)
        return True


async def test_a_model_node_pins_a_system_prompt_it_is_sent_again_and_the_configured_one_at_warm_up(config):
    """A model node takes no calls (which pin their prompt): its chat route pins a system prompt on its second
    request, never a one-off one, and stops once the model's cache refuses; warm-up pins llm.system_prompt."""
    from sub300.agent.engines import warm_up

    llm = PinningLlm(["Hi."], first_token_s=0.001, per_token_s=0.001, slots=2)
    engines = fake_engines(llm=llm, stt=FakeStt("x", delay_s=0.0), tts=FakeTts(delay_s=0.0, ms_per_piece=20))
    c = copy.deepcopy(config)
    c.llm.engine, c.llm.system_prompt = "embedded", "You are a phone agent."
    await warm_up(engines, c)
    assert llm.pinned == ["You are a phone agent."] and llm.requests[-1][0]["content"] == "You are a phone agent."
    async with Node(config, engines=engines) as node:
        async def chat(system: str) -> None:
            async with node.session.post(node.url("/v1/chat/completions"), json={"messages": [
                    {"role": "system", "content": system}, {"role": "user", "content": "Hi"}]}) as r:
                assert r.status == 200
        await chat("Agent A.")
        await chat("One-off.")
        assert llm.pinned == ["You are a phone agent."]
        await chat("Agent A.")
        assert llm.pinned == ["You are a phone agent.", "Agent A."]
        for _ in range(2):
            await chat("Agent B.")          # refused: the cache is full; the route stops trying
        await chat("Agent B.")
    assert llm.pinned == ["You are a phone agent.", "Agent A."] and llm.attempts == 3


# ------------------------------------------------------------------ the page
@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's module")
def test_the_latency_page_shows_a_remote_engines_network_part():
    latency = Path(__file__).resolve().parent.parent / "web" / "static" / "latency.js"
    script = (f"import {{ engineLine }} from {json.dumps(latency.as_uri())};\n"
              "console.log(JSON.stringify([engineLine({queue_ms: {stt: 1, llm: 2.4}, work_ms: {stt: 90, llm: 180},"
              " network_ms: {llm: 3.2}}), engineLine({queue_ms: {stt: 1}, work_ms: {stt: 90}})]));")
    out = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["stt 90 ms (queued 1) · llm 180 ms (queued 2, network 3)",
                                      "stt 90 ms (queued 1)"]


def test_a_media_node_names_each_remote_endpoint_and_warns_for_a_stage_in_process(config):
    from sub300.cli import build_parser, describe_role

    media = copy.deepcopy(config)
    media.server.role = "media"
    media.stt.engine, media.stt.base_url = "openai", "http://gpu-1:8081/v1"
    lines = describe_role(media)
    assert lines[0] == ("info", "media node: STT is remote: http://gpu-1:8081/v1 (model 'whisper-1')")
    assert [level for level, _ in lines[1:]] == ["warning", "warning"] and "LLM still runs in this process" in lines[1][1]
    assert describe_role(config) == []   # all-in-one: nothing to say
    assert build_parser().parse_args(["serve", "--role", "model", "--port", "8081"]).role == "model"
