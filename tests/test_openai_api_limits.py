"""`/v1/chat/completions` limits: max_tokens, the model's context and the request's shape are 400s, never 500s.

A named fake model that counts tokens (one per word) stands in for the
embedded one in the fast tests; the last test asks the real embedded model
(slow tier) for more than its context.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncGenerator, Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sub300.testing.fakes import fake_engines
from sub300.web.openai_api import add_openai_routes
from sub300.web.server import build_app

INTERNALS = re.compile(r"Traceback|Error\(|Exception\(|File \"|<[a-zA-Z_.]+ object at 0x")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class FakeCountingModel:
    """A fake LanguageModel with a ``context_length`` and a one-token-per-word ``encode_prompt``."""

    name = "fake-counting"

    def __init__(self, context_length: int | None = 100) -> None:
        self.context_length = context_length
        self.calls = 0

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [0] * sum(len(m["content"].split()) + 2 for m in messages)

    async def stream_chat(self, messages, *, max_tokens: int, temperature: float = 0.0,
                          ticket=None) -> AsyncGenerator[str, None]:
        self.calls += 1
        for piece in ["Paris", " it", " is", "."][:max_tokens]:
            yield piece


class Api:
    def __init__(self, app: web.Application) -> None:
        self.server = TestServer(app, host="127.0.0.1")

    async def __aenter__(self) -> Api:
        await self.server.start_server()
        self.url = str(self.server.make_url("/v1/chat/completions"))
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.server.close()

    async def post(self, payload) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        async with self.session.post(self.url, data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            assert not INTERNALS.search(text), text
            return r.status, json.loads(text)


def app_for(model, cap: int | None = 50) -> web.Application:
    app = web.Application()
    add_openai_routes(app, model, model_name="fake", default_max_tokens=8, max_tokens_cap=cap)
    return app


async def test_max_tokens_beyond_the_cap_or_the_context_is_a_400_before_the_model_runs():
    model = FakeCountingModel(context_length=100)
    async with Api(app_for(model, cap=500)) as api:
        status, body = await api.post({"messages": QUESTION, "max_tokens": 100_000})
        assert status == 400 and body["error"]["code"] == "invalid_value" and body["error"]["param"] == "max_tokens"
        assert "at most 500" in body["error"]["message"]
        status, body = await api.post({"messages": QUESTION, "max_completion_tokens": 100})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "100 tokens" in body["error"]["message"]
        # the question is 6 words + 2 = 8 tokens: 92 more fit, 93 do not
        status, body = await api.post({"messages": QUESTION, "max_tokens": 93})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "101 tokens (8 in the messages, 93 in the completion)" in body["error"]["message"]
        assert model.calls == 0
        status, body = await api.post({"messages": QUESTION, "max_tokens": 92})
        assert status == 200 and body["choices"][0]["message"]["content"] == "Paris it is."
        assert model.calls == 1


async def test_a_prompt_beyond_the_context_is_context_length_exceeded_in_both_modes():
    model = FakeCountingModel(context_length=100)
    long = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 95}]
    async with Api(app_for(model)) as api:
        for stream in (False, True):
            status, body = await api.post({"messages": long, "stream": stream, "max_tokens": 4})
            assert status == 400, body
            assert body["error"] == {"message": body["error"]["message"], "type": "invalid_request_error",
                                     "param": "messages", "code": "context_length_exceeded"}
    assert model.calls == 0


async def test_a_model_that_cannot_count_is_only_capped():
    model = FakeCountingModel(context_length=None)
    async with Api(app_for(model, cap=20)) as api:
        status, _ = await api.post({"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 20})
        assert status == 200
        status, body = await api.post({"messages": QUESTION, "max_tokens": 21})
        assert status == 400 and body["error"]["code"] == "invalid_value"


BAD_REQUESTS = {
    "max_tokens 0": {"messages": QUESTION, "max_tokens": 0},
    "max_tokens negative": {"messages": QUESTION, "max_tokens": -5},
    "max_tokens float": {"messages": QUESTION, "max_tokens": 1.5},
    "max_tokens string": {"messages": QUESTION, "max_tokens": "10"},
    "max_tokens bool": {"messages": QUESTION, "max_tokens": True},
    "max_tokens huge": {"messages": QUESTION, "max_tokens": 10**30},
    "temperature 3": {"messages": QUESTION, "temperature": 3},
    "temperature string": {"messages": QUESTION, "temperature": "hot"},
    "top_p 2": {"messages": QUESTION, "top_p": 2},
    "presence_penalty 9": {"messages": QUESTION, "presence_penalty": 9},
    "frequency_penalty list": {"messages": QUESTION, "frequency_penalty": [1]},
    "no messages": {},
    "messages object": {"messages": {"role": "user"}},
    "messages empty": {"messages": []},
    "message not object": {"messages": ["hi"]},
    "message no role": {"messages": [{"content": "hi"}]},
    "message bad role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "message content number": {"messages": [{"role": "user", "content": 42}]},
    "message image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    "too many messages": {"messages": QUESTION * 5000},
    "n 2": {"messages": QUESTION, "n": 2},
    "stream string": {"messages": QUESTION, "stream": "yes"},
    "stop too many": {"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]},
    "tools": {"messages": QUESTION, "tools": [{"type": "function"}]},
    "body array": [QUESTION],
    "body string": "hello",
}


async def test_malformed_requests_are_400_with_a_message_and_no_internals():
    model = FakeCountingModel(context_length=100)
    async with Api(app_for(model)) as api:
        for name, payload in BAD_REQUESTS.items():
            status, body = await api.post(payload)
            assert status == 400, (name, status, body)
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], name
        for raw in (b"{not json", b"", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"messages": NaN}'):
            status, body = await api.post(raw)
            assert status == 400, (raw[:20], body)
    assert model.calls == 0


async def test_the_served_app_caps_max_tokens_from_the_configuration(config):
    capped = copy.deepcopy(config)
    capped.llm.api_max_tokens = 64
    async with Api(build_app(capped, fake_engines())) as api:
        status, body = await api.post({"messages": QUESTION, "max_tokens": 100_000})
        assert status == 400 and "at most 64" in body["error"]["message"]
        status, body = await api.post({"messages": QUESTION, "max_tokens": 64})
        assert status == 200, body


@pytest.mark.slow
async def test_the_embedded_model_refuses_a_prompt_beyond_its_context(config, engines):
    llm = engines.llm
    if not getattr(llm, "context_length", None):
        pytest.skip(f"{llm.name} does not tell its context length")
    limit = llm.context_length
    big = copy.deepcopy(config)
    big.llm.api_max_tokens = 1_000_000
    async with Api(build_app(big, engines)) as api:
        status, body = await api.post({"messages": QUESTION, "max_tokens": 100_000})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        status, body = await api.post({"messages": [{"role": "user", "content": "hello " * limit}], "max_tokens": 8})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert f"maximum context length is {limit} tokens" in body["error"]["message"]
        status, body = await api.post({"messages": QUESTION, "max_tokens": 4})
        assert status == 200, body
