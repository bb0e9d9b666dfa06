"""sub300's own OpenAI-compatible endpoint, serving any LanguageModel.

``POST /v1/chat/completions`` answers with a ``chat.completion`` JSON, or with
``stream: true`` as server-sent events of ``chat.completion.chunk`` objects
ending with ``data: [DONE]``; ``GET /v1/models`` lists the one model.  Any
OpenAI client (or another sub300 through models/llm_openai.py) can then use
the embedded model.

Differences from OpenAI's API, on purpose:

* ``temperature`` defaults to 0 (greedy), the LanguageModel default, not 1.
* ``n`` must be 1; legacy ``functions`` and non-text content parts are refused
  with 400; ``stop`` (up to 4 strings) is applied here, on the text.
* ``tools`` (OpenAI function calling) are accepted when the served model can
  call them (`accepts_tools`: an OpenAI-compatible engine, so the request is
  proxied to its endpoint, tools and the messages' ``tool_calls`` / ``tool``
  results included); the answer then carries the model's calls: streamed as
  ``delta.tool_calls`` chunks (one per call, whole: index, id, name and
  arguments at once) or as ``message.tool_calls``, with ``finish_reason``
  ``"tool_calls"``.  ``tool_choice`` may be ``"auto"`` or ``"none"`` (no tools
  sent); another choice is a 400.  The embedded CTranslate2 model cannot call
  tools: a request with ``tools``, ``tool_calls`` or ``tool`` messages is a 400
  (code ``tools_unsupported``) saying so.
* ``finish_reason`` is ``"length"`` when the model yielded ``max_tokens``
  pieces (engines yield about one piece per token), otherwise ``"stop"``.

Usage: a ``chat.completion`` carries OpenAI's ``usage`` object
(``prompt_tokens``, ``completion_tokens``, ``total_tokens``), the model's own
counts (models/protocols.py `LlmUsage`: the embedded model's tokenizer, a
remote endpoint's ``usage``); a stream carries it when the request asks
``stream_options: {"include_usage": true}``, as OpenAI does: every chunk has
``"usage": null`` and a last chunk before ``[DONE]`` has ``"choices": []``
and the ``usage`` object (none after an error event).  A model that cannot
count answers ``"usage": null`` (never a guess).  Tokens the model generated
past a ``stop`` string, or before the client left, are counted: they were
computed.  After every request the `ModelUsageSink` stored under
`MODEL_USAGE_KEY` in the app (if any) is told the API key (``request[PRINCIPAL]`` of web/auth.py,
web/auth.py), the route, the usage and the status answered.

Limits, checked before the model runs (400, ``invalid_request_error``):

* ``max_tokens`` (or ``max_completion_tokens``) above ``max_tokens_cap``
  (``[llm] api_max_tokens``, 1024 by default) is refused with code
  ``invalid_value`` — refused, not clamped, so a client never gets less than
  it asked for without knowing;
* when the model tells its context (``context_length``, and
  ``encode_prompt(messages)`` to count the prompt: the embedded CTranslate2
  model does), prompt tokens + ``max_tokens`` beyond it is refused with code
  ``context_length_exceeded``, as OpenAI does; the embedded model would
  otherwise drop old turns silently (what a phone call wants, not an API);
* ``messages`` is a non-empty array of at most `MAX_MESSAGES` objects with a
  known role and text content; ``temperature`` 0–2, ``top_p`` 0–1,
  ``presence_penalty``/``frequency_penalty`` −2–2, ``n`` = 1, ``stop`` up
  to 4 strings, ``stream`` a boolean.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``:
400 for a bad request, 401 for a wrong key (only when ``api_key`` is given),
502 when the model is itself a remote endpoint that failed, 500 for another
model failure (its message is the ModelError's own sentence, which the
model layer writes for users; never a repr or a traceback), logged once.
A failure after the stream has started arrives as one ``data: {"error": …}``
event, and the stream ends without ``[DONE]``.  When the client goes away,
the model's iterator is closed at the next piece, which stops its generation.

Scheduling and timing (the model-node contract, web/server_timing.py): the
request's `WorkTicket` takes its class from ``X-Sub300-Urgency`` (absent:
committed; another value is a 400); a committed request turns slack after
its first ``AUTO_SLACK_AFTER_TOKENS`` pieces, as the embedded engine treats
a request without a caller's ticket (models/llm_batching.py), since no
caller here says when its first clause is complete.  The answer carries
``Server-Timing: queue;dur=…, work;dur=…`` (queue: submitted → the engine
started it; work: → the headers, i.e. the whole completion, or for a stream
the first piece, which the headers go out with).  A request with
``X-Sub300-Request-Id`` keeps its ticket under that id while it runs, so the
media node's ``POST /v1/requests/{id}/urgency`` changes its class (a reply
started speculatively becomes committed when the turn ends:
web/request_urgency.py).  A system prompt sent again and again is pinned in
the model's static-prompt cache (web/prompt_pinning.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

from aiohttp import web

from sub300.agent.usage import LLM_COMPLETION_TOKENS, LLM_PROMPT_TOKENS, ModelUsageSink
from sub300.models.llm_batching import AUTO_SLACK_AFTER_TOKENS
from sub300.models.protocols import (
    EndpointError,
    LanguageModel,
    LlmUsage,
    ModelError,
    ToolCall,
    accepts_tools,
    accepts_usage,
)
from sub300.models.scheduling import Urgency, WorkTicket

from .auth import PRINCIPAL
from .prompt_pinning import SystemPromptPinner
from .request_urgency import RequestIdError, echo_header, forget, track
from .server_timing import BadUrgency, request_urgency, server_timing

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
#: tools one request may offer (OpenAI's own limit)
MAX_TOOLS = 128
#: the 400 for tools on a model that cannot call them
NO_TOOLS = "the embedded model cannot call tools (no function calling); use a server whose llm.engine is openai"
_MAX_STOPS = 4
#: more messages than any chat history sub300 keeps (llm.history_turns ≤ 1000 exchanges)
MAX_MESSAGES = 4096
#: where the app keeps the sink told of every model request's usage (records, metrics); optional
MODEL_USAGE_KEY = web.AppKey("model_usage", ModelUsageSink)


class BadRequest(ValueError):
    """A request that does not follow the chat-completions schema (or our limits): a 400.

    ``param``: the offending field, ``code``: OpenAI's error code (e.g. ``context_length_exceeded``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _error_response(status: int, message: str, err_type: str, *, code: str | None = None,
                    param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}, status=status
    )


# --------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _message_text(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def _tool_calls_of(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked (id, function name, arguments as text)."""
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls must be an array", param="messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(call.get("id"), str)
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments", ""), str)):
            raise BadRequest(f"messages[{i}].tool_calls: each needs an id and a function with a name and "
                             "arguments (a JSON string)", param="messages")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": function.get("arguments", "")}})
    return out


def _tools_of(body: dict[str, Any], tools_allowed: bool) -> list[dict[str, Any]] | None:
    """The request's ``tools`` as the model takes them, or None (none, or ``tool_choice: "none"``)."""
    if body.get("functions") or body.get("function_call"):
        raise BadRequest("'functions' is not supported; use 'tools'", param="functions")
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise BadRequest("'tool_choice' may be \"auto\" or \"none\"", param="tool_choice")
    if not tools:
        return None
    if not tools_allowed:
        raise BadRequest(NO_TOOLS, param="tools", code="tools_unsupported")
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be an array of at most {MAX_TOOLS} tools", param="tools")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("each tool must be {\"type\": \"function\", \"function\": {\"name\": …}}", param="tools")
    return None if choice == "none" else tools


def parse_chat_request(body: Any, default_max_tokens: int, max_tokens_cap: int | None = None, *,
                       tools_allowed: bool = False) -> dict[str, Any]:
    """Validate a chat-completions body; returns the arguments for the model.

    ``max_tokens_cap``: the largest ``max_tokens`` accepted (None: no cap here).  ``tools_allowed``:
    the model can call tools (`accepts_tools`); else tools, tool calls and tool messages are a 400.
    Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"'messages' has {len(messages)} items; at most {MAX_MESSAGES}", param="messages")
    clean: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        if m.get("function_call"):
            raise BadRequest(f"messages[{i}]: 'function_call' is not supported; use 'tool_calls'")
        message: dict[str, Any] = {"role": _ROLES[role], "content": _message_text(i, m.get("content"))}
        if (m.get("tool_calls") or role == "tool") and not tools_allowed:
            raise BadRequest(NO_TOOLS, param="messages", code="tools_unsupported")
        if m.get("tool_calls"):
            if role != "assistant":
                raise BadRequest(f"messages[{i}]: only an assistant message has tool_calls", param="messages")
            message["tool_calls"] = _tool_calls_of(i, m["tool_calls"])
            message["content"] = message["content"] or None
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise BadRequest(f"messages[{i}]: a tool message needs its 'tool_call_id'", param="messages")
            message["tool_call_id"] = m["tool_call_id"]
        clean.append(message)

    if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
        raise BadRequest("'model' must be a string")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(stream_options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        include_usage = stream_options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options")

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
    elif max_tokens_cap is not None and max_tokens > max_tokens_cap:
        raise BadRequest(f"'max_tokens' is {max_tokens}; this server allows at most {max_tokens_cap}",
                         param="max_tokens", code="invalid_value")

    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    elif not _is_number(temperature) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' must be a number between 0 and 2", param="temperature")
    for name, low, high in (("top_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not low <= value <= high):
            raise BadRequest(f"'{name}' must be a number between {low} and {high}", param=name)

    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise BadRequest("only n=1 is supported")
    tools = _tools_of(body, tools_allowed)

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= _MAX_STOPS:
        stops = list(stop)
    else:
        raise BadRequest(f"'stop' must be a string or an array of at most {_MAX_STOPS} strings")
    stops = [s for s in stops if s]

    return {
        "messages": clean,
        "stream": stream,
        "include_usage": include_usage,
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "stops": stops,
        "tools": tools,
    }


# --------------------------------------------------------------- stop strings
class _StopFilter:
    """Cuts streamed text at the first stop string; holds back a possible prefix."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buf += piece
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.stopped = self.buf[:cut], "", True
            return out
        if len(self.buf) <= self.hold:
            return ""
        out, self.buf = self.buf[: len(self.buf) - self.hold], self.buf[len(self.buf) - self.hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# --------------------------------------------------------------- routes
def context_overflow(model: Any, messages: list[dict[str, str]], max_tokens: int) -> BadRequest | None:
    """OpenAI's ``context_length_exceeded`` when ``model`` counts tokens (``context_length`` and
    ``encode_prompt``) and the prompt plus ``max_tokens`` does not fit; None when it fits or cannot tell."""
    limit = getattr(model, "context_length", None)
    encode = getattr(model, "encode_prompt", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0 or encode is None:
        return None
    if max_tokens >= limit:   # no prompt fits: no need to count it
        return BadRequest(f"This model's maximum context length is {limit} tokens, prompt included; "
                          f"'max_tokens' is {max_tokens}. Please reduce it.",
                          param="max_tokens", code="context_length_exceeded")
    try:
        prompt = len(encode(messages))
    except Exception:   # the model will say so itself when it runs
        log.warning("cannot count the prompt's tokens", exc_info=True)
        return None
    if prompt + max_tokens <= limit:
        return None
    return BadRequest(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or the completion.",
        param="messages", code="context_length_exceeded")


def add_openai_routes(
    app: web.Application,
    model: LanguageModel,
    *,
    model_name: str,
    default_max_tokens: int = 256,
    max_tokens_cap: int | None = None,
    api_key: str | None = None,
) -> None:
    """Serve `model` as ``model_name`` under /v1 on `app` (``max_tokens_cap``: see the module docstring)."""
    created = int(time.time())
    pinner = SystemPromptPinner(model)      # a system prompt sent again and again is cached (web/prompt_pinning.py)

    def authorized(request: web.Request) -> bool:
        return api_key is None or request.headers.get("Authorization", "") == f"Bearer {api_key}"

    async def list_models(request: web.Request) -> web.Response:
        if not authorized(request):
            return _error_response(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return web.json_response({
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "sub300"}],
        })

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        usage = LlmUsage() if accepts_usage(model) else None
        response: web.StreamResponse | None = None
        try:
            response = await answer(request, usage)
            return response
        finally:
            forget(request)
            report_usage(request, usage, 500 if response is None else response.status)

    def report_usage(request: web.Request, usage: LlmUsage | None, status: int) -> None:
        """Tell the app's `ModelUsageSink` (if any) what this request consumed; a failing sink is logged."""
        sink = request.app.get(MODEL_USAGE_KEY)
        if sink is None:
            return
        principal = request.get(PRINCIPAL)
        counted = {} if usage is None or not usage.known else {
            LLM_PROMPT_TOKENS: usage.prompt_tokens or 0, LLM_COMPLETION_TOKENS: usage.completion_tokens or 0}
        try:
            sink.model_request(getattr(principal, "key_id", None), getattr(principal, "source", None) or request.remote,
                               request.path, counted, status)
        except Exception:
            log.exception("the model usage sink failed on %s", request.path)

    async def answer(request: web.Request, usage: LlmUsage | None) -> web.StreamResponse:
        if not authorized(request):
            return _error_response(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            return _error_response(413, exc.text or "request too large", "invalid_request_error")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error_response(400, "request body is not valid JSON", "invalid_request_error")
        try:
            ticket = WorkTicket(request_urgency(request), label="llm api")
            track(request, ticket)      # its urgency may change while it runs (web/request_urgency.py)
        except RequestIdError as exc:
            return exc.response()
        except BadUrgency as exc:
            return _error_response(400, str(exc), "invalid_request_error", code="invalid_urgency")
        try:
            req = parse_chat_request(body, default_max_tokens, max_tokens_cap, tools_allowed=accepts_tools(model))
            overflow = await asyncio.to_thread(context_overflow, model, req["messages"], req["max_tokens"])
            if overflow is not None:
                raise overflow
        except BadRequest as exc:
            log.info("chat completion refused: %s", exc)
            return _error_response(400, str(exc), "invalid_request_error", code=exc.code, param=exc.param)

        pinner.seen(req["messages"])
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        counted: dict[str, Any] = {} if usage is None else {"usage": usage}   # a model without the keyword: none
        if req["tools"]:
            counted["tools"] = req["tools"]
        ticket.mark_submitted()
        pieces = model.stream_chat(req["messages"], max_tokens=req["max_tokens"], temperature=req["temperature"],
                                   ticket=ticket, **counted)

        async def close_model() -> None:
            """Stop the model (idempotent); its usage is final after this."""
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                with suppress(Exception):
                    await aclose()

        try:
            if req["stream"]:
                return await _stream(request, pieces, req, completion_id, usage, close_model, ticket)
            return await _complete(request, pieces, req, completion_id, usage, close_model, ticket)
        finally:
            await close_model()

    def chunk(completion_id: str, delta: dict[str, Any] | None, finish_reason: str | None, *,
              with_usage: bool = False, usage: dict[str, int] | None = None) -> bytes:
        """One ``chat.completion.chunk``; ``delta`` None: the usage chunk (no choices)."""
        obj: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if with_usage:
            obj["usage"] = usage
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def model_failure(exc: ModelError) -> tuple[int, str, str]:
        """Status, error type and message (logged here, once).  A ModelError's text is written for
        users ("prompt of N tokens ... exceeds the context"); it is quoted, never a repr or a traceback."""
        log.warning("model %s failed: %s", getattr(model, "name", model_name), exc)
        message = f"model failed: {str(exc)[:500]}"
        if isinstance(exc, EndpointError):
            return 502, "upstream_error", message
        return 500, "server_error", message

    def client_gone(request: web.Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    def counted_piece(ticket: WorkTicket, count: int) -> None:
        """After ``count`` pieces: a committed request turns slack at `AUTO_SLACK_AFTER_TOKENS`."""
        if count == AUTO_SLACK_AFTER_TOKENS and ticket.urgency == Urgency.COMMITTED:
            ticket.urgency = Urgency.SLACK

    async def _complete(
        request: web.Request, pieces: AsyncIterator[str | ToolCall], req: dict[str, Any], completion_id: str,
        usage: LlmUsage | None, close_model: Callable[[], Awaitable[None]], ticket: WorkTicket,
    ) -> web.StreamResponse:
        stop = _StopFilter(req["stops"])
        out: list[str] = []
        calls: list[ToolCall] = []
        count = 0
        try:
            async for piece in pieces:
                if isinstance(piece, ToolCall):
                    calls.append(piece)
                    continue
                count += 1
                counted_piece(ticket, count)
                out.append(stop.feed(piece))
                if stop.stopped or client_gone(request):
                    break
        except ModelError as exc:
            status, err_type, message = model_failure(exc)
            return _error_response(status, message, err_type)
        out.append(stop.flush())
        finish = "length" if count >= req["max_tokens"] and not stop.stopped else "stop"
        answer_message: dict[str, Any] = {"role": "assistant", "content": "".join(out)}
        if calls:
            finish = "tool_calls"
            answer_message["content"] = answer_message["content"] or None
            answer_message["tool_calls"] = [_wire_call(call) for call in calls]
        await close_model()
        return web.json_response({
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0,
                "message": answer_message,
                "finish_reason": finish,
            }],
            "usage": openai_usage(usage),
        }, headers={"Server-Timing": server_timing(ticket), **echo_header(request)})

    async def _stream(
        request: web.Request, pieces: AsyncIterator[str | ToolCall], req: dict[str, Any], completion_id: str,
        usage: LlmUsage | None, close_model: Callable[[], Awaitable[None]], ticket: WorkTicket,
    ) -> web.StreamResponse:
        stop = _StopFilter(req["stops"])
        it = pieces.__aiter__()
        # Wait for the first piece before sending headers, so that a model that
        # fails at once gets a proper HTTP error status instead of an SSE event.
        try:
            first: str | ToolCall | None = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except ModelError as exc:
            status, err_type, message = model_failure(exc)
            return _error_response(status, message, err_type)

        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "Server-Timing": server_timing(ticket),
            **echo_header(request),
        })
        count = 0
        with_usage = req["include_usage"]
        try:
            await resp.prepare(request)
            await resp.write(chunk(completion_id, {"role": "assistant", "content": ""}, None, with_usage=with_usage))
            piece = first
            calls = 0
            while piece is not None:
                if isinstance(piece, ToolCall):
                    await resp.write(chunk(completion_id, {"tool_calls": [{"index": calls, **_wire_call(piece)}]},
                                           None, with_usage=with_usage))
                    calls += 1
                    try:
                        piece = await it.__anext__()
                    except StopAsyncIteration:
                        piece = None
                    continue
                count += 1
                counted_piece(ticket, count)
                text = stop.feed(piece)
                if text:
                    await resp.write(chunk(completion_id, {"content": text}, None, with_usage=with_usage))
                if stop.stopped or client_gone(request):
                    break
                try:
                    piece = await it.__anext__()
                except StopAsyncIteration:
                    piece = None
            if client_gone(request):
                return resp
            tail = stop.flush()
            if tail:
                await resp.write(chunk(completion_id, {"content": tail}, None, with_usage=with_usage))
            finish = "length" if count >= req["max_tokens"] and not stop.stopped else "stop"
            if calls:
                finish = "tool_calls"
            await resp.write(chunk(completion_id, {}, finish, with_usage=with_usage))
            if with_usage:
                await close_model()
                await resp.write(chunk(completion_id, None, None, with_usage=True, usage=openai_usage(usage)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ModelError as exc:
            _, err_type, message = model_failure(exc)
            error = {"error": {"message": message, "type": err_type, "param": None, "code": None}}
            with suppress(ConnectionError):
                await resp.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                await resp.write_eof()
        except ConnectionError:
            # the client went away while we wrote; the caller closes the model's
            # iterator (aiohttp's ClientConnectionResetError is a ConnectionError)
            log.debug("client left %s mid-stream", completion_id)
        return resp

    def openai_usage(usage: LlmUsage | None) -> dict[str, int] | None:
        """OpenAI's ``usage`` object; None when the model cannot count (never a guess)."""
        if usage is None or not usage.known:
            return None
        prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)


def _wire_call(call: ToolCall) -> dict[str, Any]:
    """A `ToolCall` in OpenAI's ``tool_calls`` shape."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


__all__ = ["add_openai_routes", "parse_chat_request", "BadRequest", "MODEL_USAGE_KEY"]
