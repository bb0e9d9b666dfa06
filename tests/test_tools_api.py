"""sub300's own /v1/chat/completions with tools: proxied to a model that calls tools (the OpenAI client
on the fake hosted API), a clear 400 on one that cannot (the embedded model; here a fake without tools=)."""
from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sub300.agent.tools import function_tool
from sub300.models.llm_openai import OpenAIChatModel
from sub300.testing.fake_openai_tools import FakeToolsApi
from sub300.testing.fakes import FakeLlm
from sub300.web.openai_api import add_openai_routes


def get_weather(city: str) -> str:
    """Today's weather in a city."""
    return ""


TOOLS = [function_tool(get_weather).schema()]
QUESTION = [{"role": "user", "content": "What's the weather in Paris and Tokyo?"}]


def client_for(model) -> TestClient:
    app = web.Application()
    add_openai_routes(app, model, model_name="fake")
    return TestClient(TestServer(app))


def events_of(raw: str) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


async def test_a_model_without_tools_answers_a_clear_400():
    llm = FakeLlm()
    async with client_for(llm) as client:
        for body in ({"messages": QUESTION, "tools": TOOLS},
                     {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]},
                     {"messages": [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]}):
            response = await client.post("/v1/chat/completions", json=body)
            error = (await response.json())["error"]
            assert response.status == 400 and error["code"] == "tools_unsupported", error
            assert "the embedded model cannot call tools" in error["message"]
        # tool_choice "none" with tools: the model still cannot take them
        response = await client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS,
                                                                    "tool_choice": "none"})
        assert response.status == 400   # still tools the model cannot take: refused, not silently dropped
    assert llm.requests == []


async def test_tool_calls_are_proxied_streamed_and_whole():
    async with FakeToolsApi() as upstream:
        model = OpenAIChatModel(upstream.base_url, "fake")
        try:
            async with client_for(model) as client:
                response = await client.post("/v1/chat/completions",
                                             json={"messages": QUESTION, "tools": TOOLS, "stream": True})
                assert response.status == 200
                events = events_of(await response.text())
                deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
                calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
                assert [(c["index"], c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in calls] == [(0, "call_1_0", "get_weather", {"city": "Paris"}),
                                            (1, "call_1_1", "get_weather", {"city": "Tokyo"})]
                assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
                assert upstream.requests[0]["tools"] == TOOLS

                response = await client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS})
                answer = (await response.json())["choices"][0]
                assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
                assert [c["id"] for c in answer["message"]["tool_calls"]] == ["call_1_0", "call_1_1"]

                exchange = [{"role": "assistant", "content": None, "tool_calls": answer["message"]["tool_calls"]},
                            {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"},
                            {"role": "tool", "tool_call_id": "call_1_1", "content": "rainy"}]
                response = await client.post("/v1/chat/completions",
                                             json={"messages": [*QUESTION, *exchange], "tools": TOOLS})
                answer = (await response.json())["choices"][0]
                assert answer["message"]["content"] == "Here is what I found: sunny. rainy."
                assert answer["finish_reason"] == "stop"
                assert upstream.requests[-1]["messages"][1:] == exchange

                response = await client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS,
                                                                            "tool_choice": "required"})
                assert response.status == 400 and (await response.json())["error"]["param"] == "tool_choice"
                response = await client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS,
                                                                            "tool_choice": "none"})
                assert response.status == 200 and "tools" not in upstream.requests[-1]
        finally:
            await model.aclose()
