"""OpenAI-compatible LLM: the client (models/llm_openai.py) and sub300's own
endpoint (web/openai_api.py).

The end-to-end tests serve the real embedded model (SmolLM2-135M converted
from the bundled GGUF to CTranslate2) on 127.0.0.1 and stream from it with
OpenAIChatModel.  The error paths use small aiohttp / asyncio servers written
here: each is a *fake of a misbehaving remote endpoint* (one that refuses,
hangs, answers 500, sends garbage), which cannot be had for real offline.
Everything listens on 127.0.0.1 with an ephemeral port and every wait is
bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sub300.models.llm_openai import OpenAIChatModel
from sub300.models.protocols import EndpointError, LanguageModel, ModelError
from sub300.web.openai_api import _StopFilter, add_openai_routes

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in English, briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
COUNTING = [
    {"role": "system", "content": "You are a helpful assistant. Answer in English."},
    {"role": "user", "content": "Count from 1 to 100, separated by commas."},
]


# ------------------------------------------------------------------ helpers
@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on 127.0.0.1:<ephemeral>; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def client_for(base_url: str, **kw) -> AsyncIterator[OpenAIChatModel]:
    llm = OpenAIChatModel(base_url, kw.pop("model", "test-model"), **kw)
    try:
        yield llm
    finally:
        await llm.aclose()


async def collect(llm: LanguageModel, messages, **kw) -> list[str]:
    async with asyncio.timeout(60):
        return [p async for p in llm.stream_chat(messages, **kw)]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse(*objs) -> bytes:
    out = b""
    for o in objs:
        data = o if isinstance(o, str) else json.dumps(o)
        out += b"data: " + data.encode() + b"\n\n"
    return out


def delta(content: str | None, finish: str | None = None) -> dict:
    d = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


class Recording:
    """Wraps a LanguageModel and records how its generation ended (not a fake:
    the pieces come from the wrapped model)."""

    def __init__(self, inner: LanguageModel) -> None:
        self.inner = inner
        self.name = inner.name
        self.pieces = 0
        self.exhausted = False
        self.closed = asyncio.Event()

    async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None):
        try:
            async for piece in self.inner.stream_chat(messages, max_tokens=max_tokens, temperature=temperature):
                self.pieces += 1
                yield piece
            self.exhausted = True
        finally:
            self.closed.set()


class FakeEndlessModel:
    """Fake LanguageModel: yields 'tick ' every 20 ms until closed (a stand-in
    for a long generation, so disconnect handling can be checked exactly)."""

    name = "fake-endless"

    def __init__(self) -> None:
        self.pieces = 0
        self.calls = 0
        self.closed = asyncio.Event()

    async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None):
        self.calls += 1
        try:
            while True:
                await asyncio.sleep(0.02)
                self.pieces += 1
                yield "tick "
        finally:
            self.closed.set()


class FakeScriptedModel:
    """Fake LanguageModel: yields fixed pieces, then optionally raises."""

    name = "fake-scripted"

    def __init__(self, pieces: list[str], error: Exception | None = None) -> None:
        self.script = pieces
        self.error = error

    async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None):
        for p in self.script[:max_tokens]:
            yield p
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------ the real embedded model
@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """SmolLM2-135M-Instruct from the bundled GGUF, converted to CT2 (float32)."""
    missing = [f for f in ("llm_ct2.py", "gguf_to_ct2.py") if not (MODELS_DIR / f).exists()]
    if missing:
        pytest.skip(f"embedded LLM engine not written yet: models/{', models/'.join(missing)} missing")
    from sub300.models.bundled import smollm2_gguf
    from sub300.models.gguf_to_ct2 import ensure_ct2_from_gguf
    from sub300.models.llm_ct2 import CTranslate2ChatModel
    from sub300.models.protocols import ModelUnavailable

    try:
        gguf = smollm2_gguf()
    except ModelUnavailable as exc:
        pytest.skip(f"bundled SmolLM2 GGUF unavailable: {exc}")
    model_dir = ensure_ct2_from_gguf(gguf, tmp_path_factory.mktemp("ct2-llm"), progress=lambda _m: None)
    return CTranslate2ChatModel(model_dir)  # device="auto": CUDA when present


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_stream_from_own_endpoint_serving_real_model(real_model):
    app = web.Application()
    add_openai_routes(app, real_model, model_name="smollm2-135m")
    direct = "".join(await collect(real_model, QUESTION, max_tokens=24))
    async with serve(app) as url, client_for(f"{url}/v1", model="smollm2-135m") as llm:
        assert isinstance(llm, LanguageModel)
        pieces = await collect(llm, QUESTION, max_tokens=24)
        assert len(pieces) >= 2, pieces  # streamed, not one lump
        text = "".join(pieces)
        assert text.strip()
        # greedy decoding: the HTTP round trip changes nothing
        assert text == direct
        # the same client and session serve a second call
        again = "".join(await collect(llm, QUESTION, max_tokens=24))
        assert again == text


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_non_stream_and_models_listing_real_model(real_model):
    app = web.Application()
    add_openai_routes(app, real_model, model_name="smollm2-135m")
    direct = "".join(await collect(real_model, QUESTION, max_tokens=16))
    async with serve(app) as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(f"{url}/v1/models") as r:
            assert r.status == 200
            listing = await r.json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == ["smollm2-135m"]

        body = {"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 16}
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            done = await r.json()
        assert done["object"] == "chat.completion"
        assert done["model"] == "smollm2-135m"
        choice = done["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == direct
        assert choice["finish_reason"] in ("stop", "length")

        # the raw SSE wire format of the streaming answer
        async with http.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            raw = (await r.read()).decode()
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == direct


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_cancel_mid_stream_stops_real_generation(real_model):
    recording = Recording(real_model)
    app = web.Application()
    add_openai_routes(app, recording, model_name="smollm2-135m")
    async with serve(app) as url, client_for(f"{url}/v1") as llm:
        got: list[str] = []
        two = asyncio.Event()

        async def consume():
            async for piece in llm.stream_chat(COUNTING, max_tokens=400):
                got.append(piece)
                if len(got) == 2:
                    two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(two.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the server notices the disconnect and closes the model's generation
        await asyncio.wait_for(recording.closed.wait(), 10)
        assert not recording.exhausted
        assert recording.pieces < 400
        # the client is still usable afterwards
        assert "".join(await collect(llm, QUESTION, max_tokens=8)).strip()


# ------------------------------------------------------------------ own endpoint, mechanics
async def test_client_disconnect_closes_generation_and_leaves_no_task():
    model = FakeEndlessModel()
    before = asyncio.all_tasks()
    app = web.Application()
    add_openai_routes(app, model, model_name="fake")
    async with serve(app) as url, client_for(f"{url}/v1") as llm:
        stream = llm.stream_chat(QUESTION, max_tokens=10_000)
        got = [await anext(stream) for _ in range(3)]
        assert got == ["tick "] * 3
        await stream.aclose()  # the consumer walks away
        await asyncio.wait_for(model.closed.wait(), 5)
        produced = model.pieces
        await asyncio.sleep(0.2)
        assert model.pieces == produced  # generation really stopped
    leaked = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}
    assert not leaked, leaked


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b"{}",
        json.dumps({"messages": "hello"}).encode(),
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": ["hi"]}).encode(),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": 3}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": 12}).encode(),
    ],
)
async def test_bad_requests_get_400_json(body):
    model = FakeEndlessModel()
    app = web.Application()
    add_openai_routes(app, model, model_name="fake")
    async with (
        serve(app) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 400
        err = (await r.json())["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert model.calls == 0


async def test_model_failure_before_and_during_stream():
    async with contextlib.AsyncExitStack() as stack:
        app = web.Application()
        add_openai_routes(app, FakeScriptedModel([], EndpointError("upstream down")), model_name="dead")
        sub = web.Application()
        add_openai_routes(sub, FakeScriptedModel(["one ", "two "], ModelError("inference blew up")), model_name="x")
        app.add_subapp("/mid", sub)
        url = await stack.enter_async_context(serve(app))
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))

        # fails before the first piece: a real HTTP status, JSON error
        for stream in (False, True):
            async with http.post(f"{url}/v1/chat/completions",
                                 json={"messages": QUESTION, "stream": stream}) as r:
                assert r.status == 502
                assert "upstream down" in (await r.json())["error"]["message"]
        llm = await stack.enter_async_context(client_for(f"{url}/v1"))
        with pytest.raises(EndpointError, match="502.*upstream down"):
            await collect(llm, QUESTION, max_tokens=8)

        # fails after streaming began: an SSE error event, which the client raises
        mid = await stack.enter_async_context(client_for(f"{url}/mid/v1"))
        got: list[str] = []
        with pytest.raises(EndpointError, match="inference blew up"):
            async for piece in mid.stream_chat(QUESTION, max_tokens=8):
                got.append(piece)
        assert got == ["one ", "two "]
        async with http.post(f"{url}/mid/v1/chat/completions", json={"messages": QUESTION}) as r:
            assert r.status == 500
            assert (await r.json())["error"]["type"] == "server_error"


async def test_stop_strings_and_api_key():
    app = web.Application()
    add_openai_routes(app, FakeScriptedModel(["Hello", " wor", "ld. By", "e now"]), model_name="x",
                      api_key="sekrit")
    async with serve(app) as url:
        async with client_for(f"{url}/v1", api_key="wrong") as llm:
            with pytest.raises(EndpointError, match="401"):
                await collect(llm, QUESTION, max_tokens=8)
        async with client_for(f"{url}/v1", api_key="sekrit", extra_body={"stop": ["ld."]}) as llm:
            assert "".join(await collect(llm, QUESTION, max_tokens=8)) == "Hello wor"
        async with client_for(f"{url}/v1", api_key="sekrit") as llm:
            assert "".join(await collect(llm, QUESTION, max_tokens=8)) == "Hello world. Bye now"

    f = _StopFilter(["END", "x"])
    out = "".join(f.feed(p) for p in ["aE", "N", "b", "EN", "D tail"])
    assert f.stopped and out == "aENb"


# ------------------------------------------------------------------ client against fakes of misbehaving endpoints
async def test_unreachable_endpoint_fails_fast():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    async with client_for(url, connect_timeout_s=3.0) as llm:
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as info:
            await collect(llm, QUESTION, max_tokens=8)
        assert time.monotonic() - t0 < 5.0
    assert f"{url}/chat/completions" in str(info.value)
    assert "connect" in str(info.value)


async def test_endpoint_that_never_answers_times_out():
    """Fake remote endpoint: accepts the TCP connection, reads, never answers."""
    conns: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(4096):
                pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for(f"http://127.0.0.1:{port}/v1", first_token_timeout_s=0.5) as llm:
            t0 = time.monotonic()
            with pytest.raises(EndpointError, match="first token|timed out"):
                await collect(llm, QUESTION, max_tokens=8)
            assert 0.4 < time.monotonic() - t0 < 3.0
        assert conns, "the fake endpoint never saw the request"
    finally:
        server.close()
        for w in conns:
            w.close()
        await server.wait_closed()


@pytest.mark.slow   # waits out real timeouts (~2 s)
async def test_stream_stalls_first_token_then_idle():
    """Fake remote endpoint: sends headers and keep-alives but no token; another
    sends one token and then stalls."""

    async def keepalive_only(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gives up first
            for _ in range(100):
                await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(0.1)
        return resp

    async def one_then_stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(delta("Hi")))
        await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_post("/a/chat/completions", keepalive_only)
    app.router.add_post("/b/chat/completions", one_then_stall)
    async with serve(app) as url:
        async with client_for(f"{url}/a", first_token_timeout_s=0.6) as llm:
            t0 = time.monotonic()
            with pytest.raises(EndpointError, match="first token"):
                await collect(llm, QUESTION, max_tokens=8)
            assert time.monotonic() - t0 < 3.0  # keep-alives do not extend it
        async with client_for(f"{url}/b", idle_timeout_s=0.5) as llm:
            got: list[str] = []
            with pytest.raises(EndpointError, match="idle"):
                async for p in llm.stream_chat(QUESTION, max_tokens=8):
                    got.append(p)
            assert got == ["Hi"]


async def test_http_500_is_an_endpoint_error_with_status_and_excerpt():
    """Fake remote endpoint that fails with 500 (JSON error) or 503 (HTML page)."""

    async def fail_json(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "CUDA out of memory", "type": "server_error"}}, status=500)

    async def fail_html(request: web.Request) -> web.Response:
        return web.Response(status=503, text="<html>" + "overloaded " * 200 + "</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/j/chat/completions", fail_json)
    app.router.add_post("/h/chat/completions", fail_html)
    async with serve(app) as url:
        async with client_for(f"{url}/j") as llm:
            with pytest.raises(EndpointError) as info:
                await collect(llm, QUESTION, max_tokens=8)
        msg = str(info.value)
        assert "500" in msg and "CUDA out of memory" in msg and f"{url}/j/chat/completions" in msg
        async with client_for(f"{url}/h") as llm:
            with pytest.raises(EndpointError) as info:
                await collect(llm, QUESTION, max_tokens=8)
        msg = str(info.value)
        assert "503" in msg and "overloaded" in msg and len(msg) < 600  # an excerpt, not the page


@pytest.mark.parametrize(
    "payload, match",
    [
        (sse("{not json"), "malformed"),
        (sse({"no": "choices"}), "without choices"),
        (sse(delta("Hi")), "ended before"),  # connection closed without [DONE] nor finish_reason
        (sse(delta("Hi"), {"error": {"message": "model crashed"}}), "model crashed"),
        (b"garbage line\n\n", "ended before"),  # not SSE: ignored, then nothing
        (b"data: [1, 2]\n\n", "malformed"),
    ],
)
async def test_malformed_streams_are_endpoint_errors(payload, match):
    """Fake remote endpoint that sends a broken event stream."""

    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(payload)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    async with serve(app) as url, client_for(f"{url}/v1") as llm:
        with pytest.raises(EndpointError, match=match):
            await collect(llm, QUESTION, max_tokens=8)


async def test_client_protocol_details():
    """Fake remote endpoint that records the request and answers in the forms
    real servers use: CRLF lines, finish_reason without [DONE], a usage-only
    chunk, and a plain JSON completion when streaming is ignored."""
    seen: list[tuple[dict, str | None]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((body, request.headers.get("Authorization")))
        mode = request.match_info["mode"]
        if mode == "json":
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        wire = sse(delta("A"), delta(" b"), delta(None, "length"), {"choices": [], "usage": {"total_tokens": 3}})
        if mode == "crlf":
            wire = wire.replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
        await resp.write(wire)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{mode}/v1/chat/completions", handler)
    async with serve(app) as url:
        async with client_for(f"{url}/crlf/v1/", model="m1", api_key="k1", extra_body={"top_p": 0.5}) as llm:
            assert await collect(llm, QUESTION, max_tokens=5, temperature=0.3) == ["A", " b"]
        async with client_for(f"{url}/nodone/v1") as llm:
            assert await collect(llm, QUESTION, max_tokens=5) == ["A", " b"]
        async with client_for(f"{url}/json/v1") as llm:
            assert await collect(llm, QUESTION, max_tokens=5) == ["whole"]
    body, auth = seen[0]
    assert auth == "Bearer k1"
    assert body["model"] == "m1" and body["stream"] is True and body["max_tokens"] == 5
    assert body["temperature"] == 0.3 and body["top_p"] == 0.5
    assert body["messages"] == QUESTION
    assert seen[1][1] is None  # no key, no Authorization header
