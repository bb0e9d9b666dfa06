"""Tools the language model may call (OpenAI function calling).

A `Tool` is a Python function with the JSON Schema of its arguments; the LLM
engine sends `schema()` with the request, and when the model asks for a call
(`sub300.models.protocols.ToolCall`) the reply runs the function and feeds
its result back (agent/reply.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


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
