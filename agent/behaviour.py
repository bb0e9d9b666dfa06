"""What a user's own agent adds to the configuration: its instructions, its tools, its event hooks.

The configuration (agent/config.py) says which engines run and how turns are
taken; a `Behaviour` says what this agent is: the system instructions (in
place of ``llm.system_prompt``), the tools the language model may call
(agent/tools.py), and listeners that hear every conversation event of every
call (agent/events.py) -- the hooks of the Python API (``sub300.Agent``).
It is transport-free: the composition root hands the same `Behaviour` to
every transport, which passes it to each call's `Conversation`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Event
    from .tools import Tool


@dataclass(frozen=True)
class Behaviour:
    #: the system message of every conversation; None: ``llm.system_prompt``
    instructions: str | None = None
    #: functions the language model may call (OpenAI function calling); empty: none
    tools: tuple[Tool, ...] = ()
    #: called with every event of every call, after the transport's own listeners; an exception is
    #: logged and the call goes on (agent/conversation.py `_emit`)
    listeners: tuple[Callable[[Event], None], ...] = ()

    def system_prompt(self, configured: str) -> str:
        """The system message: the instructions, else the configured ``llm.system_prompt``."""
        return configured if self.instructions is None else self.instructions


#: the behaviour of an agent defined by its configuration alone
DEFAULT_BEHAVIOUR = Behaviour()
