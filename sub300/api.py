"""The Python API: an `Agent` is what a user's program adds to sub300 -- instructions, tools, engines, hooks.

::

    from sub300 import Agent, function_tool, serve

    @function_tool
    def get_weather(city: str) -> str:
        \"\"\"Today's weather in a city.\"\"\"
        return f"Sunny in {city}."

    agent = Agent(instructions="You are a weather line.", tools=[get_weather], engines={"llm": "openai"})

    @agent.on("turn_ended")
    def show(event):
        print(event.transcript, "->", event.reply, event.ledger.voice_to_voice_ms)

    serve(agent, sip=True)

* ``config``: a `Config`, a TOML path, or None: the file of ``$SUB300_CONFIG``
  and the ``SUB300_*`` environment, exactly as ``sub300 serve`` reads them
  (agent/config.py `load_config`).
* ``instructions``: the system message (None: ``llm.system_prompt``).
* ``tools``: `Tool`\\ s, or typed Python functions (made tools by
  `function_tool`, agent/tools.py).
* ``engines``: stage ("vad", "stt", "llm", "tts", "turn") -> an engine name
  (an installed entry point, agent/plugins.py: set in the configuration as
  ``<stage>.engine``, ``turn.detector`` for "turn", and checked like it) or an
  engine object implementing the stage's protocol (models/protocols.py), used
  as it is: no shared pool in front of it, not warmed up, closed
  (``aclose()``, when it has one) with the server.
* hooks: ``@agent.on(name)`` or ``Agent(on={name: function})``; names, what
  each receives and how async hooks are owned: sub300/hooks.py.

The agent makes the `Behaviour` (agent/behaviour.py) every transport gives
each call, and its hooks watch every call as a call observer; ``sub300 serve``
is ``serve(Agent(config=...))`` (sub300/server.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sub300.agent.behaviour import Behaviour
from sub300.agent.config import Config, load_config, override
from sub300.agent.engines import STAGES, Engines, load_engines
from sub300.agent.tools import Tool, function_tool, tools_by_name

from .hooks import Hook, Hooks

#: stage -> (section, key) of the configuration that names its engine
ENGINE_KEYS: dict[str, tuple[str, str]] = {"vad": ("vad", "engine"), "stt": ("stt", "engine"),
                                           "llm": ("llm", "engine"), "tts": ("tts", "engine"),
                                           "turn": ("turn", "detector")}


class Agent:
    """A voice agent: see the module docstring.  Raises `ConfigError` for a bad configuration or an
    engine name that is not installed, ValueError for an unknown stage or two tools of one name,
    `ToolDefinitionError` for a function that cannot be a tool."""

    def __init__(self, instructions: str | None = None, tools: Iterable[Tool | Callable[..., Any]] = (),
                 engines: Mapping[str, str | object] | None = None,
                 config: Config | str | os.PathLike[str] | None = None,
                 on: Mapping[str, Hook | Iterable[Hook]] | None = None) -> None:
        self.instructions = instructions
        self.tools: tuple[Tool, ...] = tuple(t if isinstance(t, Tool) else function_tool(t) for t in tools)
        tools_by_name(self.tools)   # two tools of one name: ValueError now, not at the first call
        loaded = config if isinstance(config, Config) else load_config(config)
        names: dict[str, dict[str, str]] = {}
        self.engine_objects: dict[str, object] = {}
        for stage, engine in (engines or {}).items():
            if stage not in ENGINE_KEYS:
                raise ValueError(f"engines: no stage {stage!r} (stages: {', '.join(STAGES)})")
            if isinstance(engine, str):
                section, key = ENGINE_KEYS[stage]
                names.setdefault(section, {})[key] = engine
            else:
                self.engine_objects[stage] = engine
        self.config: Config = override(loaded, names, origin="Agent(engines=...)") if names else loaded
        self.hooks = Hooks()
        for name, functions in (on or {}).items():
            for function in ([functions] if callable(functions) else functions):
                self.hooks.add(name, function)

    def on(self, name: str) -> Callable[[Hook], Hook]:
        """A decorator that adds a hook: ``@agent.on("turn_ended")`` (names: sub300/hooks.py)."""

        def add(function: Hook) -> Hook:
            self.hooks.add(name, function)
            return function

        return add

    @property
    def behaviour(self) -> Behaviour:
        """What every call of this agent gets: its instructions and tools (the hooks watch the calls through
        the transports' call observer instead, where each call has its identity and its own hook tasks)."""
        return Behaviour(instructions=self.instructions, tools=self.tools)

    def load_engines(self, config: Config | None = None, progress: Callable[[str], None] = print) -> Engines:
        """The engines of ``config`` (default: the agent's), the given engine objects in place of theirs
        (blocking: seconds on the first run)."""
        return load_engines(config or self.config, progress=progress, given=self.engine_objects)
