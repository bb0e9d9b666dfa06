"""The chat route pins a system prompt it sees again and again (the model's cached static prompt).

The embedded CTranslate2 model keeps the decoder state of a chat's fixed
beginning, the system message and the user header, for the system prompts
pinned with ``pin_system_prompt`` (models/llm_ct2.py: time to first token
p50 158 → 99 ms on this CPU, scripts/bench_llm_prefix.py).  A call on this
process pins its own prompt when it starts (agent/responder.py) and `sub300
serve` pins ``llm.system_prompt`` at start-up (agent/engines.py `warm_up`),
but a model node takes no calls: its ``/v1/chat/completions`` requests come
from media nodes whose agents (agent/behaviour.py) may each have their own
instructions.  So the route counts the system messages it is sent and pins
one on its `PIN_AFTER_REQUESTS`-th request: a prompt that comes back is a
media node's agent, a one-off one is not worth a slot.

Bounds: the model caches at most its own ``MAX_STATIC_PROMPTS`` (4: CTranslate2
never evicts that cache), so once a pin is refused (the cache is full, or the
template gives no common prefix) this route pins nothing more (logged once);
counts are kept for the last `MAX_CANDIDATES` distinct prompts, by SHA-256,
the oldest forgotten first.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: the request (counting from 1) with a given system prompt on which it is pinned
PIN_AFTER_REQUESTS = 2
#: distinct system prompts whose requests are counted at once
MAX_CANDIDATES = 64


class SystemPromptPinner:
    """Counts ``model``'s requests per system prompt and pins a repeated one; a no-op for a model without
    ``pin_system_prompt`` (a remote LLM, a fake)."""

    def __init__(self, model: Any, *, pin_after: int = PIN_AFTER_REQUESTS, max_candidates: int = MAX_CANDIDATES):
        self._pin = getattr(model, "pin_system_prompt", None)
        self._name = getattr(model, "name", "the LLM")
        self.pin_after, self.max_candidates = pin_after, max_candidates
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._pinned: set[str] = set()
        self.stopped = False

    def seen(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """One request for ``messages``: its leading system message (if any) counted, pinned when due."""
        if self._pin is None or self.stopped or not messages:
            return
        first = messages[0]
        system = first.get("content")
        if first.get("role") != "system" or not isinstance(system, str) or not system:
            return
        digest = hashlib.sha256(system.encode("utf-8", "surrogatepass")).hexdigest()
        if digest in self._pinned:
            return
        count = self._counts.pop(digest, 0) + 1
        if count < self.pin_after:
            self._counts[digest] = count
            while len(self._counts) > self.max_candidates:
                self._counts.popitem(last=False)
            return
        if self._pin(system):       # the model logs a prompt it newly caches (warm-up may have pinned this one)
            self._pinned.add(digest)
            log.debug("%s: a system prompt of %d characters seen in %d requests is pinned", self._name,
                      len(system), count)
        else:
            self.stopped = True
            log.warning("%s: a repeated system prompt could not be pinned (see above); the chat route pins no "
                        "more (their requests prefill the system prompt in full)", self._name)


__all__ = ["MAX_CANDIDATES", "PIN_AFTER_REQUESTS", "SystemPromptPinner"]
