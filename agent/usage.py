"""Usage quantities: what a call or a model request consumed, for billing and capacity planning.

Every quantity is additive, so records written per turn sum to the call's
total and a consumer may add events up in any order.  A turn's ledger
carries its share in ``TurnLedger.usage`` (quantity → amount); what a call
consumed after its last turn comes in a `CallUsage` event when the
conversation closes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

#: seconds of caller audio the server received (every frame, speech or not)
CALLER_AUDIO_S = "caller_audio_s"
#: seconds of agent audio handed to the transport (what was played, not what was synthesised)
AGENT_AUDIO_S = "agent_audio_s"
#: seconds of audio the STT engine processed (partials and finals: work done, so re-transcription counts)
STT_AUDIO_S = "stt_audio_s"
#: prompt tokens the LLM read (the engine's tokenizer; an OpenAI-compatible endpoint's own count)
LLM_PROMPT_TOKENS = "llm_prompt_tokens"
#: tokens the LLM generated
LLM_COMPLETION_TOKENS = "llm_completion_tokens"
#: characters of text sent to TTS
TTS_CHARS = "tts_chars"

USAGE_QUANTITIES = (CALLER_AUDIO_S, AGENT_AUDIO_S, STT_AUDIO_S, LLM_PROMPT_TOKENS, LLM_COMPLETION_TOKENS, TTS_CHARS)


def add_usage(total: dict[str, float], more: Mapping[str, float]) -> dict[str, float]:
    """Adds ``more`` into ``total`` (in place) and returns it; unknown quantities raise KeyError."""
    for name, amount in more.items():
        if name not in USAGE_QUANTITIES:
            raise KeyError(f"unknown usage quantity {name!r}")
        total[name] = total.get(name, 0.0) + float(amount)
    return total


class ModelUsageSink(Protocol):
    """Where the OpenAI-compatible API reports each model request's usage (records, metrics)."""

    def model_request(self, key_id: str | None, source: str | None, route: str,
                      usage: Mapping[str, float], status: int) -> None:
        """``route``: e.g. "/v1/chat/completions"; ``usage``: LLM_PROMPT_TOKENS, LLM_COMPLETION_TOKENS;
        ``status``: the HTTP status answered.  Must not block (a record is queued, not written inline)."""
        ...
