"""Tools the language model may call (OpenAI function calling).

A `Tool` is a Python function with the JSON Schema of its arguments; the LLM
engine sends `schema()` with the request, and when the model asks for a call
(`sub300.models.protocols.ToolCall`) the reply runs the function and feeds
its result back (agent/reply.py).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import re
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, overload

from pydantic import TypeAdapter, ValidationError

from sub300.models.protocols import ToolCall, accepts_tools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tool:
    """One function the model may call.

    ``parameters``: a JSON Schema object (``{"type": "object", "properties": …,
    "required": […]}``) for the keyword arguments of ``function``, which may be
    a plain function or a coroutine function and returns something
    `json.dumps` can write (or a str).  ``timeout_s``: the longest a call may
    run before it is abandoned and the model told so (None: the agent's
    default).
    """

    name: str
    description: str
    function: Callable[..., Any]
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout_s: float | None = None

    def schema(self) -> dict[str, Any]:
        """The tool as the OpenAI chat completions API takes it in ``tools``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


# ------------------------------------------------------------------ from a typed Python function
class ToolDefinitionError(TypeError):
    """A function cannot be a tool: ``*args``/``**kwargs``, a parameter without a type hint, a type
    with no JSON Schema."""


@overload
def function_tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def function_tool(*, name: str | None = None, description: str | None = None,
                  timeout_s: float | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def function_tool(function: Callable[..., Any] | None = None, /, *, name: str | None = None,
                  description: str | None = None,
                  timeout_s: float | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a `Tool` of a typed Python function (plain or ``async``); a decorator, with or without arguments::

        @function_tool
        async def get_weather(city: Annotated[str, "the city, e.g. Paris"],
                              unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
            \"\"\"Today's weather in a city.\"\"\"
            ...

        @function_tool(name="lookup", timeout_s=2.0)
        def find_order(order_id: int) -> dict: ...

    The JSON Schema of the arguments is pydantic's (``TypeAdapter(function).json_schema()``), so every
    type pydantic knows works: str, int, float, bool, ``Literal``, ``Enum``, ``list[...]``, ``X | None``,
    nested models; a parameter with a default is not required, no other key is allowed
    (``additionalProperties: false``).  ``$ref`` to ``$defs`` (an Enum, a model) are inlined and the
    ``title`` keys dropped: hosted and self-hosted servers differ in what they resolve.  The description
    is ``description`` or else the docstring's first paragraph; a parameter's description is a plain
    string in its ``Annotated[...]`` metadata (``Annotated[str, "the city"]``) -- the docstring's
    ``Args:`` section is not read (one way, the one the type checker sees; pydantic's
    ``Field(description=...)`` in ``Annotated`` works as well).  Name: ``name`` or the function's.

    The model's arguments are validated before the call by the same schema (pydantic, lax mode:
    "3" is accepted for an int, an Enum from its value); an invalid call does not reach the function:
    its errors go back to the model as the tool's result (`run_tool`).  Raises `ToolDefinitionError`
    for ``*args``/``**kwargs`` or a parameter without a type hint.
    Like OpenAI's Agents SDK ``function_tool`` and LiveKit's ``function_tool``, without their docstring
    parsers.
    """
    def make(fn: Callable[..., Any]) -> Tool:
        tool_name: str = name or str(getattr(fn, "__name__", ""))
        if not _TOOL_NAME.fullmatch(tool_name):
            raise ToolDefinitionError(f"tool name {tool_name!r}: use 1-64 letters, digits, '_' or '-' (OpenAI's rule)")
        validate, parameters = _arguments_of(fn, tool_name)
        return Tool(name=tool_name, description=description if description is not None else _first_paragraph(fn),
                    function=_ValidatedFunction(fn, validate), parameters=parameters, timeout_s=timeout_s)

    if function is not None:
        return make(function)
    return make


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _first_paragraph(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _arguments_of(fn: Callable[..., Any], tool_name: str) -> tuple[Callable[[dict[str, Any]], dict[str, Any]],
                                                                    dict[str, Any]]:
    """(validate(raw kwargs) -> validated kwargs, the JSON Schema of the arguments) of ``fn``'s signature.

    A pass-through function with ``fn``'s signature goes to pydantic's `TypeAdapter`: it validates a
    dict of keyword arguments (defaults filled in, values converted) and gives the schema.
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as error:
        raise ToolDefinitionError(f"tool {tool_name}: cannot resolve its type hints ({error})") from error
    descriptions: dict[str, str] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ToolDefinitionError(f"tool {tool_name}: *{parameter.name} has no JSON Schema; name each argument")
        if parameter.name not in hints:
            raise ToolDefinitionError(f"tool {tool_name}: parameter {parameter.name!r} needs a type hint "
                                      "(the model is told each argument's type)")
        hint = hints[parameter.name]
        if typing.get_origin(hint) is Annotated:
            text = [m for m in hint.__metadata__ if isinstance(m, str)]
            if text:
                descriptions[parameter.name] = " ".join(text)

    def arguments(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    arguments.__signature__ = signature.replace(return_annotation=inspect.Signature.empty)  # type: ignore[attr-defined]
    arguments.__annotations__ = {k: v for k, v in hints.items() if k != "return"}
    arguments.__name__ = arguments.__qualname__ = tool_name
    try:
        adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(arguments)  # type: ignore[arg-type]
        schema: dict[str, Any] = adapter.json_schema()
    except Exception as error:   # pydantic's PydanticSchemaGenerationError / PydanticInvalidForJsonSchema
        raise ToolDefinitionError(f"tool {tool_name}: no JSON Schema for its arguments ({error})") from error
    schema = _inline(schema, schema.pop("$defs", {}))
    for key, described in descriptions.items():
        schema.setdefault("properties", {}).setdefault(key, {})["description"] = described
    schema.setdefault("properties", {})
    return adapter.validate_python, schema


def _inline(node: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/X"}`` replaced by X and ``title`` keys dropped."""
    if depth > 32:
        raise ToolDefinitionError("argument types nest too deeply (a recursive type?)")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline(defs[ref.removeprefix("#/$defs/")], defs, depth + 1), **_inline(rest, defs, depth + 1)}
        return {k: _inline(v, defs, depth + 1) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_inline(v, defs, depth + 1) for v in node]
    return node


class _ValidatedFunction:
    """A `function_tool`'s ``function``: validates the keyword arguments (raising `ToolArgumentsError`),
    then calls the user's function (``__wrapped__``) with the converted values."""

    def __init__(self, function: Callable[..., Any], validate: Callable[[dict[str, Any]], dict[str, Any]]):
        self.__wrapped__ = function
        self._validate = validate
        functools.update_wrapper(self, function)

    def __call__(self, **raw: Any) -> Any:
        try:
            kwargs = self._validate(raw)
        except ValidationError as error:
            raise ToolArgumentsError(_validation_text(error)) from None
        return self.__wrapped__(**kwargs)


def _validation_text(error: ValidationError) -> str:
    """pydantic's errors in one line for the model: ``city: Field required; days.0: Input should be …``."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item.get("loc", ())) or "arguments"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


# ------------------------------------------------------------------ running a call
class ToolArgumentsError(ValueError):
    """The model's arguments do not fit the tool's schema (raised before the function runs)."""


#: a tool's result longer than this is cut (characters), so one call cannot flood the prompt
MAX_RESULT_CHARS = 4000
#: outcomes of a call (`ToolResult.outcome`; the metric label of sub300_tool_calls_total)
OUTCOMES = ("ok", "error", "timeout", "invalid_arguments", "unknown_tool", "cancelled")


@dataclass(frozen=True)
class ToolResult:
    """What one call gave: ``content`` is the ``tool`` message's text the model reads (the function's
    result, or a sentence saying what went wrong, which the model can say out loud); ``outcome``: one
    of `OUTCOMES`; ``duration_s``: the call's wall time (seconds, the caller's clock)."""

    call: ToolCall
    content: str
    outcome: str
    duration_s: float

    def message(self) -> dict[str, Any]:
        """The ``tool`` message of OpenAI's chat format."""
        return {"role": "tool", "tool_call_id": self.call.id, "content": self.content}


async def run_tool(tools: Mapping[str, Tool], call: ToolCall, *, default_timeout_s: float,
                   clock: Callable[[], float] = time.monotonic) -> ToolResult:
    """Run the call ``call`` asks for and say how it went; never raises (cancellation aside).

    The arguments must be a JSON object (the model's text, `ToolCall.arguments`; empty means ``{}``);
    the function runs with its `Tool.timeout_s`, else ``default_timeout_s``; a coroutine function on the
    event loop, a plain one in a worker thread (``asyncio.to_thread``: on a timeout or a cancellation
    the thread is not stopped -- Python cannot -- only its result is dropped, and that is logged).
    Each failure becomes the result's text, for the model: ``error: …`` with an unknown tool, invalid
    arguments, the function's exception (its type and message), or the timeout.  Cancelling the
    awaiting task (barge-in, hang-up) cancels the function's coroutine.
    """
    started = clock()

    def done(content: str, outcome: str) -> ToolResult:
        if len(content) > MAX_RESULT_CHARS:
            content = content[:MAX_RESULT_CHARS] + f"… (cut at {MAX_RESULT_CHARS} characters)"
        return ToolResult(call, content, outcome, max(0.0, clock() - started))

    tool = tools.get(call.name)
    if tool is None:
        log.warning("the model called an unknown tool %r (tools: %s)", call.name, ", ".join(tools) or "none")
        return done(f"error: there is no tool named {call.name!r}; the tools are: {', '.join(tools) or 'none'}",
                    "unknown_tool")
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError as error:
        log.info("tool %s: arguments are not JSON (%s): %.200r", call.name, error, call.arguments)
        return done(f"error: the arguments of {call.name} are not valid JSON ({error}); call it again with a "
                    "JSON object", "invalid_arguments")
    if not isinstance(arguments, dict):
        return done(f"error: the arguments of {call.name} must be a JSON object", "invalid_arguments")
    timeout_s = tool.timeout_s if tool.timeout_s is not None else default_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            if inspect.iscoroutinefunction(tool.function) or inspect.iscoroutinefunction(
                    getattr(tool.function, "__wrapped__", None)):
                result = tool.function(**arguments)
            else:
                result = await asyncio.to_thread(tool.function, **arguments)
            if inspect.isawaitable(result):
                result = await result
    except ToolArgumentsError as error:
        log.info("tool %s: invalid arguments %.200r: %s", call.name, call.arguments, error)
        return done(f"error: invalid arguments for {call.name}: {error}", "invalid_arguments")
    except TimeoutError:
        log.warning("tool %s did not finish within %g s: abandoned (a function in a thread runs on unseen)",
                    call.name, timeout_s)
        return done(f"error: {call.name} did not answer within {timeout_s:g} seconds", "timeout")
    except Exception as error:
        log.warning("tool %s failed: %s: %s", call.name, type(error).__name__, error)
        return done(f"error: {call.name} failed: {type(error).__name__}: {error}", "error")
    if isinstance(result, str):
        return done(result, "ok")
    try:
        return done(json.dumps(result, ensure_ascii=False), "ok")
    except (TypeError, ValueError):
        log.warning("tool %s returned a %s, which is not JSON: sent as str()", call.name, type(result).__name__)
        return done(str(result), "ok")


def tools_by_name(tools: Sequence[Tool]) -> dict[str, Tool]:
    """``{name: tool}``; raises ValueError for two tools of one name."""
    out: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in out:
            raise ValueError(f"two tools are named {tool.name!r}")
        out[tool.name] = tool
    return out


class ToolsUnsupported(ValueError):
    """An agent has tools but its language model cannot call them (the embedded CTranslate2 model)."""


def check_tools(llm: Any, tools: Sequence[Tool]) -> None:
    """Raise `ToolsUnsupported` when ``tools`` is not empty and ``llm`` cannot take them (its
    ``stream_chat`` has no ``tools`` keyword: `accepts_tools`).  For start-up, before any call."""
    if tools and not accepts_tools(llm):
        names = ", ".join(t.name for t in tools)
        raise ToolsUnsupported(
            f"the agent has tools ({names}) but its LLM {getattr(llm, 'name', llm)!r} cannot call tools "
            "(the embedded CTranslate2 model has no function calling): use llm.engine = \"openai\" with an "
            "endpoint that supports tools, or remove the tools")
