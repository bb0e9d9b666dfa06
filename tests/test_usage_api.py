"""Usage over HTTP: sub300's OpenAI-compatible endpoint answers OpenAI's ``usage`` object and tells its
`ModelUsageSink`; the OpenAI-compatible client reads a server's usage chunk (and says when there is none).

The model behind the endpoint is `FakeLlm` (words count as tokens); the server without usage is a
small aiohttp app here (a fake of a remote endpoint that ignores ``stream_options``).
"""
from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from aiohttp import web

from sub300.agent.auth.authenticator import Principal
from sub300.agent.usage import LLM_COMPLETION_TOKENS, LLM_PROMPT_TOKENS
from sub300.models.llm_openai import OpenAIChatModel
from sub300.models.protocols import LlmUsage
from sub300.testing.fakes import FakeLlm
from sub300.web.auth import PRINCIPAL
from sub300.web.openai_api import MODEL_USAGE_KEY, add_openai_routes

from .test_openai_llm import serve

pytestmark = [pytest.mark.timeout(30),
              # web/auth.py keeps the principal under a plain string key, as this test does
              pytest.mark.filterwarnings("ignore:It is recommended to use web.RequestKey")]

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
PROMPT_WORDS = 5
TOKENS = ["Paris", " is", " the", " capital", "."]     # 4 words


class Sink:
    def __init__(self) -> None:
        self.requests: list[tuple] = []

    def model_request(self, key_id, source, route, usage, status) -> None:
        self.requests.append((key_id, source, route, dict(usage), status))


def sub300_app(sink: Sink | None = None) -> web.Application:
    @web.middleware
    async def principal(request: web.Request, handler):   # what web/auth.py's middleware leaves on a request
        request[PRINCIPAL] = Principal(key_id="key1", scopes=frozenset({"model"}), source="10.1.2.3")
        return await handler(request)

    app = web.Application(middlewares=[principal])
    add_openai_routes(app, FakeLlm(TOKENS, first_token_s=0.001, per_token_s=0.001), model_name="fake")
    if sink is not None:
        app[MODEL_USAGE_KEY] = sink
    return app


def events(raw: bytes) -> list:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in raw.decode().split("\n") if line.startswith("data: ")]


async def test_the_endpoint_answers_usage_and_tells_the_sink():
    sink = Sink()
    expected = {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 4, "total_tokens": PROMPT_WORDS + 4}
    async with serve(sub300_app(sink)) as base, aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/chat/completions", json={"messages": QUESTION}) as resp:
            body = await resp.json()
        assert body["usage"] == expected
        assert body["choices"][0]["message"]["content"] == "Paris is the capital."

        ask = {"messages": QUESTION, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(f"{base}/v1/chat/completions", json=ask) as resp:
            streamed = events(await resp.read())
        *chunks, last, done = streamed
        assert done == "[DONE]"
        assert last["choices"] == [] and last["usage"] == expected and last["object"] == "chat.completion.chunk"
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)   # as OpenAI: null before the last
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        async with http.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "stream": True}) as resp:
            plain = events(await resp.read())
        assert all("usage" not in c for c in plain[:-1])       # not asked for: no usage chunk

        async with http.post(f"{base}/v1/chat/completions",
                             json={"messages": QUESTION, "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 400                          # OpenAI's rule: stream_options needs stream
    counted = {LLM_PROMPT_TOKENS: PROMPT_WORDS, LLM_COMPLETION_TOKENS: 4}
    route = "/v1/chat/completions"
    assert sink.requests == [("key1", "10.1.2.3", route, counted, 200)] * 3 + [("key1", "10.1.2.3", route, {}, 400)]


async def test_a_stop_string_still_bills_the_tokens_generated():
    sink = Sink()
    async with (serve(sub300_app(sink)) as base, aiohttp.ClientSession() as http,
                http.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "stop": " the"}) as resp):
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Paris is"
    # the model had generated "Paris is the" when the stop string was seen: 3 words, computed, billed
    assert body["usage"]["completion_tokens"] == 3 == sink.requests[0][3][LLM_COMPLETION_TOKENS]


async def test_the_client_reads_the_usage_chunk():
    async with serve(sub300_app()) as base:
        llm = OpenAIChatModel(f"{base}/v1", "fake")
        try:
            usage = LlmUsage()
            text = "".join([p async for p in llm.stream_chat(QUESTION, max_tokens=20, usage=usage)])
        finally:
            await llm.aclose()
    assert text == "Paris is the capital."
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reported_by) == (PROMPT_WORDS, 4, "endpoint")


async def test_an_endpoint_without_usage_leaves_it_unknown_and_says_so_once(caplog):
    asked: list[dict] = []

    async def no_usage(request: web.Request) -> web.StreamResponse:
        asked.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece, finish in (("Hi", None), (None, "stop")):
            delta = {} if piece is None else {"content": piece}
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", no_usage)
    async with serve(app) as base:
        llm = OpenAIChatModel(f"{base}/v1", "m")
        try:
            with caplog.at_level(logging.WARNING, logger="sub300.models.llm_openai"):
                usages = [LlmUsage(), LlmUsage()]
                for usage in usages:
                    assert [p async for p in llm.stream_chat(QUESTION, max_tokens=5, usage=usage)] == ["Hi"]
        finally:
            await llm.aclose()
    assert asked[0]["stream_options"] == {"include_usage": True}
    assert all(u.prompt_tokens is None and u.completion_tokens is None and not u.known for u in usages)
    assert len([r for r in caplog.records if "sent no usage" in r.getMessage()]) == 1
