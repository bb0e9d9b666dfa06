"""What a conversation tells the outside world (CLI, data channel, metrics).

Plain dataclasses with a `kind`, so a transport can serialise them with
`to_dict()` without knowing each type.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ledger import TurnLedger
from .turn_state import TurnState  # re-exported: the state is on the wire in StateChanged


@dataclass(frozen=True)
class StateChanged:
    state: TurnState
    kind: str = "state"


@dataclass(frozen=True)
class TranscriptEvent:
    turn: int
    text: str
    final: bool
    kind: str = "transcript"


@dataclass(frozen=True)
class AgentSpeech:
    """A piece of the reply handed to TTS (the page shows it as it is spoken)."""

    turn: int
    text: str
    kind: str = "agent_text"


@dataclass(frozen=True)
class ToolCalled:
    """A tool call the model asked for has ended (agent/tools.py `run_tool`; the page and hooks show it).

    ``arguments``: the model's JSON text; ``outcome``: ok | error | timeout | invalid_arguments |
    unknown_tool | cancelled (barge-in or hang-up while it ran); ``duration_ms``: its wall time;
    ``result``: the start of the text the model got back (at most 200 characters; errors say what
    went wrong)."""

    turn: int
    name: str
    arguments: str
    duration_ms: float
    outcome: str
    result: str = ""
    kind: str = "tool_called"


@dataclass(frozen=True)
class TurnFinished:
    turn: int
    transcript: str
    reply: str
    ledger: TurnLedger
    kind: str = "turn"


@dataclass(frozen=True)
class TurnHeard:
    """The caller's side reported hearing turn ``turn``'s reply (WebRTC data channel): ``ledger`` now
    holds the transport parts, ``first_audio_heard``, and both mouth-to-ear figures (agent/ledger.py).
    Comes after the turn's `TurnFinished` (or `TurnFailed`), once per turn."""

    turn: int
    ledger: TurnLedger
    kind: str = "turn_heard"


@dataclass(frozen=True)
class TurnDiscarded:
    """Speech was detected but held no words (a cough, a click, noise).  ``ledger``: the turn's (its
    usage: the transcriptions it ran), set by the conversation before listeners see it; None from
    code that emits it without one."""

    turn: int
    reason: str
    ledger: TurnLedger | None = None
    kind: str = "turn_discarded"


@dataclass(frozen=True)
class TurnFailed:
    """An engine failed for this turn; the call goes on.

    ``error``: one line naming the stage and what happened (e.g. ``LLM endpoint
    http://…/chat/completions: connection dropped after 6 pieces of text``);
    ``stage``: stt | llm | tts | internal; ``failure``: the error's kind, a
    short fixed word (``ModelError.kind``: dropped, timeout, http_5xx, empty, …)
    fit for a metric label; ``reply``: what the caller heard of the answer (the
    part spoken before the failure, then the fallback line), as kept in the
    history; ``ledger``: the turn's marks, with the note ``failed``.
    """

    turn: int
    error: str
    stage: str = "internal"
    failure: str = "error"
    transcript: str = ""
    reply: str = ""
    ledger: TurnLedger | None = None
    kind: str = "turn_failed"


@dataclass(frozen=True)
class BargeInEvent:
    """Caller voice while the agent spoke: `paused` at once, then `interrupted` or `resumed`."""

    outcome: str              # paused | interrupted | resumed
    reaction_ms: float | None  # voice onset → agent silent, once known
    kind: str = "barge_in"


@dataclass(frozen=True)
class HangupRequested:
    """The agent wants to end the call (the caller said goodbye); sent after its reply has played."""

    turn: int
    reason: str
    kind: str = "hangup"


@dataclass(frozen=True)
class CallHeld:
    """The far end put the call on hold (SIP re-INVITE, RFC 3264 §8.4): the agent's audio and turn detection pause."""

    kind: str = "call_held"


@dataclass(frozen=True)
class CallResumed:
    """The hold ended: the agent's audio continues where it stopped, or the rest was dropped (``dropped_s`` > 0)."""

    dropped_s: float          # seconds of agent audio dropped at the resume (0 when it continues)
    kind: str = "call_resumed"


@dataclass(frozen=True)
class CallUsage:
    """What the call consumed since its last turn report (quantities of agent/usage.py), emitted once
    by `Conversation.aclose()`, before the transport reports the call ended: the turns' ``usage``
    and this add up to the call's totals (agent/metering.py)."""

    usage: dict[str, float]
    kind: str = "call_usage"


@dataclass(frozen=True)
class CallRecorded:
    """The call's audio was recorded (agent/recording.py): the WAV's path and length (seconds), emitted once
    by `Conversation.aclose()`, before `CallUsage`; the records store keeps the path."""

    path: str = dataclasses.field(metadata={"server_only": True})   # never sent to the caller
    seconds: float = 0.0
    kind: str = "call_recorded"


@dataclass(frozen=True)
class TransportStats:
    """A transport's packet counts of the call, reported once before it ends (the metrics count them).

    ``direction``: "from_caller" (the caller's packets as we received them: SIP RTP, lost = declared
    lost by the reorder buffer) or "to_caller" (ours as the caller's side received them).
    ``packets_received`` is None when the transport does not know it."""

    packets_received: int | None
    packets_lost: int
    direction: str = "from_caller"
    kind: str = "transport_stats"


Event = ToolCalled | TransportStats | CallRecorded | CallUsage | CallHeld | CallResumed | BargeInEvent | HangupRequested | StateChanged | TranscriptEvent | AgentSpeech | TurnFinished | TurnHeard | TurnDiscarded | TurnFailed
EventHandler = Callable[[Event], None]


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event as JSON for the caller's data channel or WebSocket: fields marked ``server_only`` left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        if f.metadata.get("server_only"):
            continue
        value = getattr(event, f.name)
        if isinstance(value, TurnLedger):
            value = value.to_dict()
        elif isinstance(value, enum.Enum):
            value = value.value
        out[f.name] = value
    return out
