"""Conversation history for the language model: system prompt + recent exchanges.

An exchange is the caller's words and what the caller heard of the answer; when the model called
tools for it, the exchange also keeps, between the two, the assistant's ``tool_calls`` messages and
the ``tool`` results (OpenAI's chat format) of the rounds that completed, so the model knows what it
looked up.  They are bounded with the exchanges (``max_turns``; each result is at most
agent/tools.py `MAX_RESULT_CHARS`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    system_prompt: str
    max_turns: int = 8
    _exchanges: list[tuple[str, str]] = field(default_factory=list)
    #: per exchange, its tool messages (parallel to ``_exchanges``; mostly empty)
    _tool_messages: list[tuple[Mapping[str, Any], ...]] = field(default_factory=list)

    def messages_for(self, user_text: str) -> list[dict[str, Any]]:
        """The prompt for a new user turn (the turn itself is not stored yet)."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        count = min(self.max_turns, len(self._exchanges)) if self.max_turns else 0
        recent = self._exchanges[len(self._exchanges) - count:]
        tools = self._tool_messages[len(self._tool_messages) - count:]
        for (user, assistant), tool_messages in zip(recent, tools, strict=True):
            messages.append({"role": "user", "content": user})
            messages.extend(dict(m) for m in tool_messages)
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": user_text})
        return messages

    def add(self, user_text: str, assistant_text: str, tool_messages: Sequence[Mapping[str, Any]] = ()) -> None:
        """Store an exchange; `assistant_text` is what the caller actually heard; ``tool_messages``: the
        assistant ``tool_calls`` and ``tool`` messages in between (complete rounds only)."""
        self._exchanges.append((user_text, assistant_text))
        self._tool_messages.append(tuple(tool_messages))
        if self.max_turns and len(self._exchanges) > 4 * self.max_turns:
            del self._exchanges[: -self.max_turns]
            del self._tool_messages[: -self.max_turns]

    @property
    def exchanges(self) -> list[tuple[str, str]]:
        return list(self._exchanges)
