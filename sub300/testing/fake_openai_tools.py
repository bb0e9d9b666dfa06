"""Fakes of a language model that calls tools (OpenAI function calling), for tests and examples.

* `FakeToolsApi` — a FAKE of a hosted OpenAI-compatible chat API (aiohttp on
  127.0.0.1, a free port): ``POST /v1/chat/completions`` streams
  ``chat.completion.chunk`` server-sent events as OpenAI does, with
  ``delta.tool_calls`` (each call's ``id``, ``type`` and ``function.name`` in
  its first delta, ``function.arguments`` in 3 pieces, several calls
  interleaved by ``index``), ``finish_reason: "tool_calls"``, a usage chunk
  when asked (``stream_options.include_usage``) and ``data: [DONE]``; with
  ``stream: false`` one ``chat.completion`` with ``message.tool_calls``.  Any
  OpenAI client can use it (models/llm_openai.py, sub300's own
  ``/v1/chat/completions`` proxying to it).
* `FakeToolLlm` — the same rules in process (no HTTP), on virtual time:
  a `ToolCallingModel` for the reply's fast tests.

The rules (`weather_rules`, or your own ``rules(messages, tool_names)``):

1. the last message is a ``tool`` result: answer with text that includes
   the results ("Here is what I found: <result>. <result>.");
2. the last user message mentions the weather and ``get_weather`` is offered:
   call ``get_weather(city=…)`` once per city named after "in", "and", "for"
   or "," (capitalised words: "the weather in Paris and Tokyo" makes two calls
   at once); no city named: ask which city;
3. anything else: a short text answer.

It is a fake: no model, no sampling, the same words every time.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from sub300.models.protocols import ChatMessage, LlmUsage, ToolCall
from sub300.models.scheduling import WorkTicket

#: ``rules(messages, tool_names) -> the answer``: text pieces and tool calls, in order
Rules = Callable[[Sequence[ChatMessage], Sequence[str]], list["str | ToolCall"]]

_CITY = re.compile(r"(?:\bin|\band|\bfor|,)\s+([A-Z][a-zA-Z-]+)")


def weather_rules(messages: Sequence[ChatMessage], tool_names: Sequence[str]) -> list[str | ToolCall]:
    """The module docstring's rules: tool results → text with them; weather → ``get_weather`` calls."""
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        results: list[str] = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            results.insert(0, str(message.get("content", "")).strip().rstrip("."))
        return _words("Here is what I found: " + ". ".join(results) + ".")
    user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
    if "weather" in user.lower() and "get_weather" in tool_names:
        cities = _CITY.findall(user)
        if not cities:
            return _words("Which city would you like the weather for?")
        turn = sum(1 for m in messages if m.get("role") == "user")
        return [ToolCall(f"call_{turn}_{i}", "get_weather", json.dumps({"city": city}))
                for i, city in enumerate(cities)]
    return _words("I am a fake model. Ask me about the weather.")


def _words(text: str) -> list[str | ToolCall]:
    """``text`` in streamed pieces: one word each (with its leading space)."""
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]


def split_in_three(text: str) -> list[str]:
    """``text`` cut into 3 pieces (some may be empty for a very short text): how the fake streams arguments."""
    a, b = len(text) // 3, 2 * len(text) // 3
    return [text[:a], text[a:b], text[b:]]


def _tool_names(tools: Any) -> list[str]:
    names = []
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


# ------------------------------------------------------------------ over HTTP
class FakeToolsApi:
    """A FAKE hosted chat-completions API that streams tool calls (see the module docstring).

    ``async with FakeToolsApi() as api:`` serves on 127.0.0.1 (``port`` 0: a free one);
    ``api.base_url`` is ``http://127.0.0.1:PORT/v1``.  ``requests`` keeps every request body;
    ``chunk_delay_s`` sleeps before each chunk (the loop's clock: virtual under looptime).
    """

    def __init__(self, rules: Rules = weather_rules, *, chunk_delay_s: float = 0.0, port: int = 0):
        self.rules, self.chunk_delay_s, self.port = rules, chunk_delay_s, port
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeToolsApi:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets, "the fake API did not bind"   # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]   # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        answer = self.rules(body.get("messages") or [], _tool_names(body.get("tools")))
        created, model = int(time.time()), body.get("model", "fake")
        usage = {"prompt_tokens": sum(len(str(m.get("content") or "").split()) for m in body.get("messages", [])),
                 "completion_tokens": len(answer)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        calls = [item for item in answer if isinstance(item, ToolCall)]
        text = "".join(item for item in answer if isinstance(item, str))
        finish = "tool_calls" if calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = [_wire_call(call) for call in calls]
            return web.json_response({"id": "chatcmpl-fake", "object": "chat.completion", "created": created,
                                      "model": model, "choices": [{"index": 0, "message": message,
                                                                   "finish_reason": finish}], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> None:
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                           "finish_reason": finish_reason}], **extra}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": ""})
        for item in answer:
            if isinstance(item, str):
                await send({"content": item})
        for chunk in tool_call_deltas(calls):
            await send({"tool_calls": chunk})
        await send({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(None, usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _wire_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(calls: Sequence[ToolCall]) -> list[list[dict[str, Any]]]:
    """The ``delta.tool_calls`` lists that stream ``calls``: each call's first delta (index, id, type,
    name, no arguments yet), then its arguments in 3 pieces, the calls' pieces interleaved."""
    out: list[list[dict[str, Any]]] = [
        [{"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]
        for i, call in enumerate(calls)]
    pieces = [split_in_three(call.arguments) for call in calls]
    for step in range(3):
        for i in range(len(calls)):
            out.append([{"index": i, "function": {"arguments": pieces[i][step]}}])
    return out


# ------------------------------------------------------------------ in process
class FakeToolLlm:
    """A `ToolCallingModel` in process, answering by ``rules`` (default `weather_rules`): each text piece
    after ``first_token_s`` (the first) or ``per_token_s``, the tool calls together after ``call_s``.

    ``requests`` keeps the messages of every request, ``tools`` the tool names it was given.
    """

    name = "fake-tool-llm"

    def __init__(self, rules: Rules = weather_rules, *, first_token_s: float = 0.05, per_token_s: float = 0.01,
                 call_s: float = 0.05):
        self.rules = rules
        self.first_token_s, self.per_token_s, self.call_s = first_token_s, per_token_s, call_s
        self.requests: list[list[ChatMessage]] = []
        self.tools: list[list[str]] = []

    async def stream_chat(self, messages: Sequence[ChatMessage], *, max_tokens: int, temperature: float = 0.0,
                          ticket: WorkTicket | None = None, usage: LlmUsage | None = None,
                          tools: Sequence[Mapping[str, Any]] | None = None) -> AsyncGenerator[str | ToolCall, None]:
        self.requests.append(list(messages))
        names = _tool_names(tools)
        self.tools.append(names)
        if ticket is not None:
            ticket.mark_started()
        if usage is not None:
            usage.prompt_tokens, usage.completion_tokens, usage.reported_by = 0, 0, "fake"
        answer = self.rules(messages, names)
        first = True
        for item in answer:
            if isinstance(item, str):
                await asyncio.sleep(self.first_token_s if first else self.per_token_s)
                first = False
                if usage is not None:
                    usage.completion_tokens = (usage.completion_tokens or 0) + 1
                yield item
        calls = [item for item in answer if isinstance(item, ToolCall)]
        if calls:
            await asyncio.sleep(self.call_s)
            for call in calls:
                yield call


__all__ = ["FakeToolsApi", "FakeToolLlm", "weather_rules", "tool_call_deltas", "split_in_three"]


async def _serve_forever(port: int) -> None:
    async with FakeToolsApi(port=port) as api:
        print(f"FAKE tool-calling chat API (weather rules) on {api.base_url}; Ctrl-C stops it", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":   # a demo LLM for scripts/examples/weather_agent.py: python -m ... [--port 8000]
    import argparse
    import contextlib

    parser = argparse.ArgumentParser(description="a FAKE OpenAI-compatible API that streams tool calls")
    parser.add_argument("--port", type=int, default=8000)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(parser.parse_args().port))
