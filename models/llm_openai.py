"""A LanguageModel that streams from any OpenAI-compatible chat endpoint.

vLLM, SGLang, llama.cpp's server, a hosted API, or another sub300's own
``/v1/chat/completions`` (web/openai_api.py): the request is
``POST {base_url}/chat/completions`` with ``stream: true`` and the answer is
read as server-sent events, one ``chat.completion.chunk`` per ``data:`` line,
until ``data: [DONE]``.

Every failure becomes an EndpointError that names the URL, of a subclass
per kind (models/protocols.py; ``kind`` is the metric label):
`EndpointUnreachable` (connection refused, DNS), `EndpointTimeout`,
`EndpointHTTPError` (4xx/5xx, with a short excerpt of the body),
`EndpointDropped` (the connection closed or broke before ``[DONE]`` or a
``finish_reason``; the message says after how many pieces),
`EndpointStreamError` (an ``{"error": ...}`` event inside the stream) and
`EndpointProtocolError` (a stream that cannot be parsed).  A stream that
finishes cleanly without any content is not an error here: what counts as
"nothing to say" is the caller's business (agent/reply.py).
Nothing waits forever: connecting is bounded by ``connect_timeout_s``, the
first token by ``first_token_timeout_s`` (counted from the request's start),
and every later wait for the next piece of text by ``idle_timeout_s``
(counted from when the consumer asks for it; keep-alive comments and empty
chunks do not extend either limit, so a server that stalls while keeping the
connection busy still fails the turn).  Cancelling the
consumer (or ``aclose()`` on the iterator) closes the HTTP connection at once,
which is how a server such as vLLM learns to stop generating.

The HTTP client, its failures, headers (Bearer key, ``X-Sub300-Urgency``),
the urgency changes that follow a request (``{base_url}/requests/{id}/urgency``:
a reply started speculatively is committed on the model node too when the
turn ends) and Server-Timing are models/remote.py's, shared with the remote
STT and TTS.
Many calls share one client.  HTTP/1.1 carries one stream per connection,
so ``max_connections`` streams run at once (aiohttp's own default pool of
100 would queue the 101st silently, inside its connect timeout).  Beyond
that, requests wait for a free connection in a `PriorityLimiter`, committed
work first; the wait is the ticket's queue wait, it counts against the first
token's limit, and it is logged.  Idle connections are kept for
`KEEPALIVE_TIMEOUT_S`, less than the servers' own keep-alive.

Usage: every request asks for ``stream_options: {"include_usage": true}``
(OpenAI's stream option, which vLLM, SGLang and llama.cpp's server follow):
the server then sends a last chunk with ``"choices": []`` and a ``usage``
object, whose ``prompt_tokens`` and ``completion_tokens`` fill the request's
`LlmUsage` (``reported_by="endpoint"``; a server that sends usage on every
chunk is read the same way, the last one wins).  An endpoint that sends no
usage leaves the counts None: nothing is guessed, and the engine logs it once
(``extra_body={"stream_options": None}`` drops the option for a server that
refuses it).  A stream closed before its end has no usage chunk: unknown.

Tools (OpenAI function calling): ``stream_chat(..., tools=[Tool.schema(), …])`` sends ``tools`` and
``tool_choice: "auto"``; the messages may then carry the assistant's ``tool_calls`` and ``tool``
results, sent as they are.  The streamed ``choices[0].delta.tool_calls`` deltas are assembled by their
``index`` (several calls in one answer; ``id``, ``type`` and ``function.name`` in a call's first delta,
``function.arguments`` in pieces, OpenAI's stream format) and each call is yielded as one `ToolCall`
once complete: at the chunk with a ``finish_reason`` (``"tool_calls"``, or any other), else at
``[DONE]`` or the stream's clean end.  A tool-call delta counts as the first token and resets the
idle limit (the arguments may take a while), but not as a piece of text for ``max_tokens``.  A call
without an id or a name is malformed (`EndpointProtocolError`).  A completion answered in one JSON
(a server that ignored ``stream``) gives its ``message.tool_calls`` the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, overload

import aiohttp

from . import defaults
from .protocols import (
    ChatMessage,
    EndpointDropped,
    EndpointError,
    EndpointProtocolError,
    EndpointStreamError,
    EndpointTimeout,
    LlmUsage,
    ToolCall,
)
from .remote import BODY_EXCERPT_CHARS, KEEPALIVE_TIMEOUT_S, Followed, RemoteEndpoint, body_excerpt
from .scheduling import WorkTicket

log = logging.getLogger(__name__)

#: default of ``max_connections`` (llm.max_connections): concurrent streams, one connection each
MAX_CONNECTIONS = 256

class OpenAIChatModel:
    """Streams chat completions from an OpenAI-compatible HTTP endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = defaults.OPENAI_CONNECT_TIMEOUT_S,
        first_token_timeout_s: float = defaults.OPENAI_FIRST_TOKEN_TIMEOUT_S,
        idle_timeout_s: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        extra_body: dict | None = None,
        retries: int = 0,
    ) -> None:
        """``max_connections``: streams open at once (one HTTP/1.1 connection each); more wait.

        ``retries``: resends of a request refused before the endpoint began to answer (models/remote.py;
        0 = none, the default: an LLM request is the turn's critical path and its first-token limit short).
        Raises EndpointError for a base_url that is not http(s), ValueError
        for ``max_connections`` < 1.
        """
        self.base_url = base_url.rstrip("/")
        self.endpoint = RemoteEndpoint(
            "LLM", f"{self.base_url}/chat/completions", api_key=api_key, connect_timeout_s=connect_timeout_s,
            max_connections=max_connections, headers={"Accept": "text/event-stream"},
            requests_url=f"{self.base_url}/requests",     # urgency changes follow a request (models/remote.py)
        )
        self.url = self.endpoint.url
        self.model = model
        self.name = f"openai:{model}"
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.retries = retries
        self.extra_body = dict(extra_body or {})
        self._no_usage_logged = False
        log.info("LLM endpoint %s: up to %d streams at once (max_connections, one connection each; "
                 "more wait, committed first); idle connections kept %g s",
                 self.url, max_connections, KEEPALIVE_TIMEOUT_S)

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.url!r}, model={self.model!r})"

    async def aclose(self) -> None:
        await self.endpoint.aclose()

    # ------------------------------------------------------------ request
    def _payload(self, messages: Sequence[ChatMessage], max_tokens: int, temperature: float,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [_wire_message(m) for m in messages],
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = [dict(t) for t in tools]
            body["tool_choice"] = "auto"
        body.update(self.extra_body)
        if body.get("stream_options") is None:
            body.pop("stream_options", None)
        return body

    def _error(self, what: str, cls: type[EndpointError] = EndpointProtocolError) -> EndpointError:
        """An error of kind ``cls`` whose message names this endpoint's URL."""
        return self.endpoint.error(what, cls)

    @overload
    def stream_chat(self, messages: Sequence[ChatMessage], *, max_tokens: int, temperature: float = 0.0,
                    ticket: WorkTicket | None = None, usage: LlmUsage | None = None,
                    tools: None = None) -> AsyncGenerator[str, None]: ...

    @overload
    def stream_chat(self, messages: Sequence[ChatMessage], *, max_tokens: int, temperature: float = 0.0,
                    ticket: WorkTicket | None = None, usage: LlmUsage | None = None,
                    tools: Sequence[Mapping[str, Any]]) -> AsyncGenerator[str | ToolCall, None]: ...

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        ticket: WorkTicket | None = None,
        usage: LlmUsage | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncGenerator[str | ToolCall, None]:
        """Yield the content pieces of the streamed answer, in order, and with ``tools`` the
        `ToolCall`s the model asks for (see the module docstring).

        The ``ticket`` is marked started when a connection is free and the
        request is sent (its queue wait is the wait for a connection, 0 while
        fewer than ``max_connections`` streams are open), finished when the
        stream ends.  At the first byte, the endpoint's Server-Timing (when it
        sends one: a sub300 model node does) fills the ticket's
        ``remote_queue_s`` and ``network_s`` (models/remote.py); without it
        the server's own queue (vLLM and SGLang schedule and batch
        continuously) is part of the work as seen from here.
        Raises EndpointTimeout if no connection frees before the first
        token's limit.  ``usage``: the server's own counts, once its usage
        chunk came (see the module docstring).
        """
        payload = self._payload(messages, max_tokens, temperature, tools)
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + self.first_token_timeout_s
        ticket = ticket or WorkTicket(label="llm")
        async with contextlib.AsyncExitStack() as stack:
            await self.endpoint.slot(ticket, first_deadline, stack, self.first_token_timeout_s)
            followed = self.endpoint.follow(ticket, stack)    # a promotion reaches the endpoint's ticket too
            seen = LlmUsage()
            inner = self._stream(payload, max_tokens, first_deadline, seen, ticket, followed)
            try:
                async with contextlib.aclosing(inner):
                    async for piece in inner:
                        yield piece
                if not seen.known:
                    self._log_no_usage()
            finally:
                if usage is not None and seen.known:
                    usage.prompt_tokens, usage.completion_tokens = seen.prompt_tokens, seen.completion_tokens
                    usage.reported_by = "endpoint"

    def _log_no_usage(self) -> None:
        """Say once per engine that the endpoint's answers carry no usage (their tokens are not billed)."""
        if not self._no_usage_logged:
            self._no_usage_logged = True
            log.warning("LLM endpoint %s sent no usage (stream_options.include_usage): its requests' tokens "
                        "are unknown and not counted (logged once)", self.url)

    async def _stream(self, payload: dict[str, Any], max_tokens: int, first_deadline: float, usage: LlmUsage,
                      ticket: WorkTicket, followed: Followed | None = None) -> AsyncGenerator[str | ToolCall, None]:
        """One request on one connection: the content pieces of the SSE stream; ``usage`` gets the
        server's counts when it sends them."""
        loop = asyncio.get_running_loop()
        got_token = False
        pieces = 0
        waiting_since = loop.time()    # since the consumer asked for the next piece

        def after() -> str:
            return f"after {pieces} piece{'' if pieces == 1 else 's'} of text"

        def read_deadline() -> float:
            return first_deadline if not got_token else waiting_since + self.idle_timeout_s

        def timeout_error() -> EndpointError:
            if got_token:
                return self._error(f"no text for {self.idle_timeout_s:g} s {after()} (idle timeout)",
                                   EndpointTimeout)
            return self._error(f"no first token within {self.first_token_timeout_s:g} s", EndpointTimeout)

        resp = await self.endpoint.post(deadline=first_deadline, limit=f"first token {self.first_token_timeout_s:g} s",
                                        ticket=ticket, retries=self.retries, followed=followed, json=payload)
        finished_cleanly = False
        try:
            ctype = resp.content_type
            if ctype == "application/json":
                # A server that ignored stream=true and answered in one piece.
                try:
                    async with asyncio.timeout_at(read_deadline()):
                        raw = await resp.read()
                except TimeoutError:
                    raise timeout_error() from None
                text = self._content_of_completion(raw, usage)
                if text:
                    yield text
                for call in self._tool_calls_of_completion(raw):
                    yield call
                finished_cleanly = True
                return
            if ctype != "text/event-stream":
                excerpt = await body_excerpt(resp, min(2.0, self.idle_timeout_s))
                raise self._error(f"unexpected content type {ctype!r}{excerpt}")

            data_lines: list[str] = []
            finish_reason: str | None = None
            calls = _ToolCallAssembly(self._error)
            while True:
                try:
                    async with asyncio.timeout_at(read_deadline()):
                        raw_line = await resp.content.readline()
                except TimeoutError:
                    raise timeout_error() from None
                except ValueError as exc:  # a line beyond the reader's limit
                    raise self._error(f"malformed event stream ({exc})") from exc
                except aiohttp.ClientError as exc:
                    # the type says it all (ClientPayloadError: the body ended early); its text is aiohttp's internals
                    raise self._error(f"connection dropped {after()} ({type(exc).__name__})",
                                      EndpointDropped) from exc
                at_eof = raw_line == b""
                line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
                if line and not at_eof:
                    if line.startswith(":"):
                        continue  # SSE comment / keep-alive
                    field, _, value = line.partition(":")
                    if field == "data":
                        data_lines.append(value[1:] if value.startswith(" ") else value)
                    # other fields (event, id, retry, unknown) are ignored, as SSE says
                    continue
                if at_eof and line.startswith("data:"):
                    # last line without its newline: still one field of the event
                    data_lines.append(line[5:].lstrip(" "))
                # blank line (or end of stream): dispatch the event
                if data_lines:
                    data, data_lines = "\n".join(data_lines), []
                    if data.strip() == "[DONE]":
                        for call in calls.complete():
                            yield call
                        finished_cleanly = True
                        return
                    piece, reason = self._parse_chunk(data, after, usage, calls)
                    if calls.changed:
                        calls.changed = False
                        got_token = True
                        waiting_since = loop.time()
                    if reason:
                        finish_reason = reason
                        for call in calls.complete():
                            yield call
                        waiting_since = loop.time()
                    if piece:
                        if pieces >= max_tokens:
                            # every piece is at least one token: a server that goes on has ignored
                            # max_tokens (an endless stream would keep the agent talking); stop here
                            log.warning("LLM endpoint %s: more than max_tokens=%d pieces of text; stopped reading",
                                        self.url, max_tokens)
                            return
                        got_token = True
                        pieces += 1
                        yield piece
                        waiting_since = loop.time()
                if at_eof:
                    if finish_reason is None:
                        raise self._error(f"connection dropped {after()} (the stream ended before [DONE] "
                                          "or a finish_reason)", EndpointDropped)
                    for call in calls.complete():
                        yield call
                    finished_cleanly = True  # some servers close without [DONE]
                    return
        finally:
            if finished_cleanly:
                resp.release()
            else:
                # cancelled, closed early or failed: drop the connection so the
                # server sees the disconnect and stops generating.
                resp.close()

    # ------------------------------------------------------------ parsing
    def _parse_chunk(self, data: str, after: Callable[[], str] = lambda: "",
                     usage: LlmUsage | None = None,
                     calls: _ToolCallAssembly | None = None) -> tuple[str, str | None]:
        """One ``chat.completion.chunk`` → (content piece, finish_reason); its ``usage`` object, if
        any, goes into ``usage``, its ``delta.tool_calls`` into ``calls``.

        ``after()`` says how far the stream got, for the message of an error event.
        """
        try:
            obj = json.loads(data)
        except ValueError:
            raise self._error(f"malformed event data {data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise self._error(f"malformed event data {data[:80]!r}")
        if obj.get("error"):
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            where = after()
            raise self._error(f"error event in the stream{' ' + where if where else ''}: "
                              f"{str(msg)[:BODY_EXCERPT_CHARS]}", EndpointStreamError)
        if usage is not None:
            self._read_usage(obj, usage)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise self._error(f"chunk without choices: {data[:80]!r}")
        if not choices:
            return "", None  # e.g. a final usage-only chunk
        choice = choices[0]
        if not isinstance(choice, dict):
            raise self._error(f"malformed choice in chunk: {data[:80]!r}")
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is not None and not isinstance(content, str):
            raise self._error(f"non-text delta content: {data[:80]!r}")
        tool_deltas = delta.get("tool_calls") if isinstance(delta, dict) else None
        if tool_deltas:
            if calls is None:
                raise self._error(f"tool call in the answer of a request without tools: {data[:80]!r}")
            calls.add(tool_deltas, data)
        return content or "", choice.get("finish_reason")

    def _read_usage(self, obj: dict[str, Any], usage: LlmUsage) -> None:
        """OpenAI's ``usage`` object of a chunk or completion into ``usage``; a malformed one is logged
        and ignored (the text is still good)."""
        found = obj.get("usage")
        if found is None:
            return
        prompt = found.get("prompt_tokens") if isinstance(found, dict) else None
        completion = found.get("completion_tokens") if isinstance(found, dict) else None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)):
            log.warning("LLM endpoint %s: malformed usage %.80r ignored", self.url, found)
            return
        usage.prompt_tokens, usage.completion_tokens, usage.reported_by = prompt, completion, "endpoint"

    def _content_of_completion(self, raw: bytes, usage: LlmUsage | None = None) -> str:
        try:
            obj = json.loads(raw)
            if obj.get("error"):
                raise self._error(f"error: {str(obj['error'])[:BODY_EXCERPT_CHARS]}", EndpointStreamError)
            if usage is not None and isinstance(obj, dict):
                self._read_usage(obj, usage)
            content = obj["choices"][0]["message"]["content"]
        except EndpointError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self._error(f"malformed completion {raw[:80]!r}") from None
        if content is not None and not isinstance(content, str):
            raise self._error(f"non-text completion content {raw[:80]!r}")
        return content or ""

    def _tool_calls_of_completion(self, raw: bytes) -> list[ToolCall]:
        """The ``message.tool_calls`` of a whole ``chat.completion`` (already parsed once by
        `_content_of_completion`), as `ToolCall`s."""
        message = json.loads(raw)["choices"][0]["message"]
        found = message.get("tool_calls") if isinstance(message, dict) else None
        if not found:
            return []
        calls = _ToolCallAssembly(self._error)
        calls.add([{**c, "index": i} if isinstance(c, dict) else c for i, c in enumerate(found)], raw[:80].decode(
            "utf-8", errors="replace"))
        return calls.complete()


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    """A message as the endpoint takes it: role and content, and the tool fields when present
    (an assistant's ``tool_calls``, a tool result's ``tool_call_id`` and ``name``)."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content")}
    for key in ("tool_calls", "tool_call_id", "name"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


class _ToolCallAssembly:
    """Streamed ``tool_calls`` deltas assembled into calls, by ``index`` (OpenAI's stream format:
    ``id`` and ``function.name`` in a call's first delta, ``function.arguments`` in pieces)."""

    def __init__(self, error: Callable[[str], EndpointError]):
        self._error = error
        self._parts: dict[int, dict[str, Any]] = {}
        #: a delta came since the last look (the stream is alive, though no text came)
        self.changed = False

    def add(self, deltas: Any, data: str) -> None:
        if not isinstance(deltas, list):
            raise self._error(f"malformed tool_calls delta: {data[:80]!r}")
        for delta in deltas:
            if not isinstance(delta, dict):
                raise self._error(f"malformed tool_calls delta: {data[:80]!r}")
            index = delta.get("index", len(self._parts) if delta.get("id") else max(self._parts, default=0))
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise self._error(f"malformed tool_calls index: {data[:80]!r}")
            part = self._parts.setdefault(index, {"id": "", "name": "", "arguments": []})
            function = delta.get("function") or {}
            if not isinstance(function, dict):
                raise self._error(f"malformed tool_calls function: {data[:80]!r}")
            for key, value in (("id", delta.get("id")), ("name", function.get("name"))):
                if value is not None:
                    if not isinstance(value, str):
                        raise self._error(f"malformed tool call {key}: {data[:80]!r}")
                    part[key] = part[key] or value
            arguments = function.get("arguments")
            if arguments is not None:
                if not isinstance(arguments, str):   # a server that sends an object rather than its JSON text
                    arguments = json.dumps(arguments)
                part["arguments"].append(arguments)
            self.changed = True

    def complete(self) -> list[ToolCall]:
        """The calls assembled so far, in index order (and forgotten)."""
        calls = []
        for index in sorted(self._parts):
            part = self._parts[index]
            if not part["id"] or not part["name"]:
                raise self._error(f"tool call {index} without an id or a name "
                                  f"(id {part['id']!r}, name {part['name']!r})")
            calls.append(ToolCall(part["id"], part["name"], "".join(part["arguments"])))
        self._parts.clear()
        return calls


__all__ = ["OpenAIChatModel"]
