"""The OpenAI-compatible client (models/llm_openai.py) under many concurrent streams.

Deployments that outgrow one process point `OpenAIChatModel` at vLLM or
SGLang, which batch all open requests continuously: the client must keep
every call's stream open at once, unmixed, and close a cancelled one at once
so the server stops generating it.  `FakeVllmEndpoint` is a *fake* of vLLM's
``/v1/chat/completions`` streaming (its chunk shape: a role chunk, content
deltas, a final ``finish_reason`` chunk, ``data: [DONE]``), serving each
stream with a per-token delay on 127.0.0.1 and counting what a server sees:
requests open at once, finished streams, disconnects.  Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest
from aiohttp import web

from sub300.agent.config import Config
from sub300.models import llm_openai
from sub300.models.llm_openai import OpenAIChatModel
from sub300.models.protocols import EndpointTimeout
from sub300.models.scheduling import Urgency, WorkTicket

from .test_openai_llm import client_for, serve

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


def answer(name: str, n_tokens: int) -> list[str]:
    """The pieces the fake serves to the request whose user message is ``name``."""
    return [f"{name}.{i} " for i in range(n_tokens)]


class FakeVllmEndpoint:
    """Fake of vLLM's OpenAI-compatible streaming endpoint, counting what it sees.

    Each request's answer is `answer(user message, n_tokens)`, one piece per
    ``token_delay_s``.  The first piece waits until ``gather`` requests are
    open at once (or ``gather_timeout_s`` passed), like a batch that fills
    up: then ``peak`` measures how many streams the client ran together, not
    how fast this loop is.  ``hold``, while unset, keeps every stream before
    its first piece.  The streams named in ``paused`` stop after
    ``pause_after`` pieces and send only SSE keep-alive comments (for at
    most ``gather_timeout_s``), so a test can cut them at a known point.  A
    client that goes away is seen at the next write (aiohttp raises
    ConnectionResetError; vLLM's server likewise notices the disconnect and
    aborts the request) and counted in ``disconnected``.
    """

    def __init__(self, *, n_tokens: int = 8, token_delay_s: float = 0.005, gather: int = 1,
                 gather_timeout_s: float = 5.0, paused: frozenset[str] = frozenset(), pause_after: int = 0) -> None:
        self.n_tokens, self.token_delay_s = n_tokens, token_delay_s
        self.gather, self.gather_timeout_s = gather, gather_timeout_s
        self.paused, self.pause_after = paused, pause_after
        self.open = self.peak = self.finished = self.disconnected = 0
        self.arrivals: list[str] = []
        self.gathered = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()
        self.idle = asyncio.Event()   # set whenever no request is open

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    def chunk(self, delta: dict, finish: str | None = None) -> bytes:
        obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "fake-vllm",
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = body["messages"][-1]["content"]
        self.arrivals.append(name)
        self.open += 1
        self.idle.clear()
        self.peak = max(self.peak, self.open)
        if self.open >= self.gather:
            self.gathered.set()
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(self.chunk({"role": "assistant", "content": ""}))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gather_timeout_s):
                    await self.gathered.wait()
            await self.hold.wait()
            for i, piece in enumerate(answer(name, min(self.n_tokens, int(body["max_tokens"])))):
                if name in self.paused and i == self.pause_after:
                    paused_until = time.monotonic() + self.gather_timeout_s
                    while time.monotonic() < paused_until:
                        await asyncio.sleep(self.token_delay_s)
                        await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(self.token_delay_s)
                await resp.write(self.chunk({"content": piece}))
            await resp.write(self.chunk({"content": ""}, "stop") + b"data: [DONE]\n\n")
            await resp.write_eof()
            self.finished += 1
            return resp
        except ConnectionError:
            self.disconnected += 1
            raise
        finally:
            self.open -= 1
            if not self.open:
                self.idle.set()


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.002)


def ask(name: str) -> list[dict]:
    return [{"role": "user", "content": name}]


async def test_64_concurrent_streams_overlap_unmixed_and_cancelled_ones_disconnect():
    n, n_cancelled, cut_after = 64, 10, 3
    names = [f"call{i:02d}" for i in range(n)]
    server = FakeVllmEndpoint(n_tokens=8, token_delay_s=0.005, gather=n,
                              paused=frozenset(names[:n_cancelled]), pause_after=cut_after)
    tickets = {name: WorkTicket(label=name) for name in names}
    reached = {name: asyncio.Event() for name in names[:n_cancelled]}

    async def consume(llm: OpenAIChatModel, name: str) -> list[str]:
        pieces = []
        async for piece in llm.stream_chat(ask(name), max_tokens=50, ticket=tickets[name]):
            pieces.append(piece)
            if name in reached and len(pieces) == cut_after:
                reached[name].set()
        return pieces

    async with serve(server.app()) as url, client_for(f"{url}/v1") as llm:
        tasks = {name: asyncio.create_task(consume(llm, name)) for name in names}
        async with asyncio.timeout(10):
            await asyncio.gather(*(e.wait() for e in reached.values()))
        for name in reached:                  # cancel 10 callers mid-stream (barge-in, hang-up)
            tasks[name].cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)
        await asyncio.wait_for(server.idle.wait(), 5)

    results = dict(zip(names, done, strict=True))
    assert server.peak >= 60, f"only {server.peak} requests were open at once: the client queued streams"
    for name in names[n_cancelled:]:
        assert results[name] == answer(name, 8), name          # its own complete text, nothing of another
        assert tickets[name].started is not None and tickets[name].finished is not None
    for name in names[:n_cancelled]:
        assert isinstance(results[name], asyncio.CancelledError), name
        assert tickets[name].started is not None
    assert server.disconnected == n_cancelled                   # the server saw each cancelled stream go
    assert server.finished == n - n_cancelled


async def test_streams_beyond_max_connections_wait_committed_first_and_it_is_logged(caplog):
    server = FakeVllmEndpoint(n_tokens=2, token_delay_s=0.001)
    server.hold.clear()
    tickets = {name: WorkTicket(urgency, label=name) for name, urgency in [
        ("first", Urgency.COMMITTED), ("second", Urgency.COMMITTED),
        ("speculative", Urgency.SPECULATIVE), ("late-committed", Urgency.COMMITTED)]}

    async def consume(llm: OpenAIChatModel, name: str) -> str:
        return "".join([p async for p in llm.stream_chat(ask(name), max_tokens=10, ticket=tickets[name])])

    async with serve(server.app()) as url, client_for(f"{url}/v1", max_connections=2) as llm:
        caplog.set_level(logging.WARNING, logger=llm_openai.__name__)
        tasks = [asyncio.create_task(consume(llm, name)) for name in ("first", "second")]
        await wait_until(lambda: server.open == 2)
        for name in ("speculative", "late-committed"):      # both queue for a connection, in this order
            tasks.append(asyncio.create_task(consume(llm, name)))
            await wait_until(lambda name=name: tickets[name].submitted is not None)
        await asyncio.sleep(0.01)
        assert server.open == 2 and tickets["speculative"].started is None
        server.hold.set()
        texts = await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert texts == ["".join(answer(name, 2)) for name in ("first", "second", "speculative", "late-committed")]
    assert server.peak == 2
    assert server.arrivals[2:] == ["late-committed", "speculative"]   # committed work goes first
    for name in ("speculative", "late-committed"):
        assert tickets[name].queue_wait_s > 0.0, name      # the wait for a connection is the queue wait
    warnings = [r.getMessage() for r in caplog.records if "connections (max_connections)" in r.getMessage()]
    assert len(warnings) == 1 and "all 2 connections" in warnings[0], warnings   # said once, not per request


@pytest.mark.slow    # waits out a real (short) timeout
async def test_no_free_connection_before_the_first_token_limit_is_a_timeout():
    server = FakeVllmEndpoint(n_tokens=100, token_delay_s=0.05)   # the holder streams for 5 s
    async with serve(server.app()) as url, \
            client_for(f"{url}/v1", max_connections=1, first_token_timeout_s=0.3) as llm:
        holder = asyncio.create_task(anext(aiter(llm.stream_chat(ask("holder"), max_tokens=5))))
        await wait_until(lambda: server.open == 1)
        started = time.monotonic()
        with pytest.raises(EndpointTimeout, match=r"no free connection within 0.3 s: all 1 \(max_connections\)"):
            await anext(aiter(llm.stream_chat(ask("waiter"), max_tokens=5)))
        assert time.monotonic() - started < 2.0
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    assert server.arrivals == ["holder"]


@pytest.mark.asyncio(loop_scope="session")
async def test_max_connections_is_configured_and_defaults_alike():
    from sub300.agent.engines import _openai_llm

    c = Config()
    assert c.llm.max_connections == llm_openai.MAX_CONNECTIONS
    c.llm.engine, c.llm.max_connections = "openai", 7
    assert _openai_llm(c).max_connections == 7
    with pytest.raises(ValueError, match="max_connections"):
        OpenAIChatModel("http://127.0.0.1:1/v1", "m", max_connections=0)
