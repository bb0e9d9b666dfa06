"""Conversation history for the language model: system prompt + recent exchanges."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    system_prompt: str
    max_turns: int = 8
    _exchanges: list[tuple[str, str]] = field(default_factory=list)

    def messages_for(self, user_text: str) -> list[dict[str, str]]:
        """The prompt for a new user turn (the turn itself is not stored yet)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        recent = self._exchanges[-self.max_turns:] if self.max_turns else []
        for user, assistant in recent:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        messages.append({"role": "user", "content": user_text})
        return messages

    def add(self, user_text: str, assistant_text: str) -> None:
        """Store an exchange; `assistant_text` is what the caller actually heard."""
        self._exchanges.append((user_text, assistant_text))
        if self.max_turns and len(self._exchanges) > 4 * self.max_turns:
            del self._exchanges[: -self.max_turns]

    @property
    def exchanges(self) -> list[tuple[str, str]]:
        return list(self._exchanges)
