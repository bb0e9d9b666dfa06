"""Hooks: a user's functions called on conversation events (``@agent.on("turn_ended")``).

Each hook name selects events of agent/events.py (or the call's start and
end, which only the transport knows: `CallStarted`, `CallEnded` below).  The
names follow what a turn means to the person writing the agent, after
pipecat's ``on_user_turn_started`` / LiveKit Agents' ``user_input_transcribed``
and ``agent_state_changed``:

==================  ===================================  ==========================================
hook                the function receives                when
==================  ===================================  ==========================================
``call_started``    `CallStarted` (call_id, transport,   a call was set up (WebRTC, SIP, WebSocket)
                    context: key id, source address)
``turn_started``    `StateChanged` (state                the caller started speaking (a new turn; also
                    ``caller_speaking``)                 over the agent: a barge-in may follow)
``transcript``      `TranscriptEvent` (turn, text,       a partial (``final`` False) or the final
                    final)                               transcript of the caller's turn
``agent_speech``    `AgentSpeech` (turn, text)           a piece of the reply goes to TTS (the agent
                                                         is about to say it)
``tool_called``     `ToolCalled` (name, arguments,        a tool call the model asked for ended
                    duration_ms, outcome, result)        (agent/tools.py)
``barge_in``        `BargeInEvent` (outcome: paused |    the caller spoke over the agent
                    interrupted | resumed, reaction_ms)
``turn_ended``      `TurnFinished` (turn, transcript,    a turn was answered; ``ledger``: every
                    reply, ledger)                       mark, stage and voice_to_voice_ms
``turn_failed``     `TurnFailed` (turn, error, stage,    an engine failed that turn (the caller heard
                    failure, transcript, reply, ledger)  the fallback line); the call goes on
``turn_discarded``  `TurnDiscarded` (turn, reason)       speech with no words (a cough, noise)
``turn_heard``      `TurnHeard` (turn, ledger)           a WebRTC caller reported hearing the reply
                                                         (mouth-to-ear figures in the ledger)
``hangup``          `HangupRequested` (turn, reason)     the agent will hang up (the caller said bye)
``state``           `StateChanged` (state)               every change of the turn state
``call_usage``      `CallUsage` (usage)                  once, as the call closes: what it consumed
                                                         since its last turn report
``call_ended``      `CallEnded` (call_id, transport,     the call is over
                    reason)
``event``           any of the above, and every other    every event
                    event (held, resumed, transport
                    stats, the tools' events)
==================  ===================================  ==========================================

A hook takes the event; a hook with a parameter named ``call`` also gets the
call's `CallStarted` (``call.call_id``, ``call.transport``,
``call.context``).  A plain function runs at once, on the event loop, inside
the call's pipeline: keep it short (a log line, a counter) or make it
``async``.  An ``async`` hook runs as a task owned by its call (agent/tasks.py
`TaskOwner`); when the call ends its hooks still running get
``HOOK_GRACE_S`` to finish, then are cancelled -- a server's shutdown waits
for that.  A hook that raises is logged with its name and the event; the call
goes on.  Hooks of one event run in the order they were added; async hooks of
successive events may overlap.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sub300.agent.calls import CallContext
from sub300.agent.events import (
    AgentSpeech,
    BargeInEvent,
    CallUsage,
    Event,
    HangupRequested,
    StateChanged,
    ToolCalled,
    TranscriptEvent,
    TurnDiscarded,
    TurnFailed,
    TurnFinished,
    TurnHeard,
    TurnState,
)
from sub300.agent.tasks import TaskOwner

log = logging.getLogger(__name__)

#: seconds a call's async hooks still running at its end may take before they are cancelled
HOOK_GRACE_S = 5.0


@dataclass(frozen=True)
class CallStarted:
    """A call was set up: ``call_id`` (the transport's id, as in the records and logs), ``transport``
    ("webrtc", "sip", "twilio", "pcm", ...), ``context``: who it belongs to (agent/calls.py)."""

    call_id: str
    transport: str
    context: CallContext | None = None
    kind: str = "call_started"


@dataclass(frozen=True)
class CallEnded:
    """The call is over; ``reason``: the transport's words (hung up, caller vanished, drain, ...)."""

    call_id: str
    transport: str
    reason: str
    kind: str = "call_ended"


HookEvent = Event | CallStarted | CallEnded
Hook = Callable[..., Any]

#: hook name -> does it take this event
HOOKS: dict[str, Callable[[Any], bool]] = {
    "call_started": lambda e: isinstance(e, CallStarted),
    "turn_started": lambda e: isinstance(e, StateChanged) and e.state == TurnState.CALLER_SPEAKING,
    "transcript": lambda e: isinstance(e, TranscriptEvent),
    "agent_speech": lambda e: isinstance(e, AgentSpeech),
    "tool_called": lambda e: isinstance(e, ToolCalled),
    "barge_in": lambda e: isinstance(e, BargeInEvent),
    "turn_ended": lambda e: isinstance(e, TurnFinished),
    "turn_failed": lambda e: isinstance(e, TurnFailed),
    "turn_discarded": lambda e: isinstance(e, TurnDiscarded),
    "turn_heard": lambda e: isinstance(e, TurnHeard),
    "hangup": lambda e: isinstance(e, HangupRequested),
    "state": lambda e: isinstance(e, StateChanged),
    "call_usage": lambda e: isinstance(e, CallUsage),
    "call_ended": lambda e: isinstance(e, CallEnded),
    "event": lambda e: True,
}


def check_hook(name: str, function: Hook) -> None:
    """Raise ValueError for an unknown hook name, TypeError for something not callable."""
    if name not in HOOKS:
        raise ValueError(f"no hook named {name!r} (hooks: {', '.join(HOOKS)})")
    if not callable(function):
        raise TypeError(f"hook {name!r}: {function!r} is not callable")


def _wants_call(function: Hook) -> bool:
    try:
        return "call" in inspect.signature(function).parameters
    except (TypeError, ValueError):   # a builtin without a signature
        return False


class Hooks:
    """The hooks of one agent, and its calls' hook tasks.

    A `CallObserver` (agent/calls.py): a transport's ``call_started`` gets the call's listener, which
    runs the hooks of each event; ``call_ended`` runs the ``call_ended`` hooks, then ends the call's
    async hooks (`HOOK_GRACE_S`).  `aclose` (the server's shutdown) waits for those endings."""

    def __init__(self, grace_s: float = HOOK_GRACE_S) -> None:
        self.grace_s = grace_s
        self._hooks: list[tuple[str, Hook, bool]] = []
        self._calls: dict[tuple[str, str], _CallHooks] = {}
        self._endings = TaskOwner("hooks/endings")

    def add(self, name: str, function: Hook) -> None:
        check_hook(name, function)
        self._hooks.append((name, function, _wants_call(function)))

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def names(self) -> list[str]:
        return [name for name, _, _ in self._hooks]

    # ------------------------------------------------------------ CallObserver
    def call_started(self, transport: str, call_id: str,
                     context: CallContext | None = None) -> Callable[[Event], None]:
        call = _CallHooks(self, CallStarted(call_id, transport, context))
        self._calls[(transport, call_id)] = call
        call.dispatch(call.started)
        return call.dispatch

    def call_ended(self, transport: str, call_id: str, reason: str) -> None:
        call = self._calls.pop((transport, call_id), None)
        if call is None:
            log.warning("hooks: %s call %s ended but was never started", transport, call_id)
            return
        call.dispatch(CallEnded(call_id, transport, reason))
        if len(call.tasks):
            self._endings.spawn(call.end(self.grace_s), name=f"hooks of {transport} call {call_id}: end")
        else:
            call.tasks.cancel()

    async def aclose(self) -> None:
        """Wait for the calls' hook endings (each bounded by the grace), then end any call still open."""
        pending = self._endings.all_tasks()
        if pending:
            await asyncio.wait(pending, timeout=self.grace_s + 1.0)
        for call in list(self._calls.values()):
            await call.tasks.aclose()
        self._calls.clear()
        await self._endings.aclose()

    def matching(self, event: HookEvent) -> Iterable[tuple[str, Hook, bool]]:
        return [(name, fn, wants_call) for name, fn, wants_call in self._hooks if HOOKS[name](event)]


class _CallHooks:
    """One call's hooks: its identity and the tasks of its async hooks."""

    def __init__(self, hooks: Hooks, started: CallStarted) -> None:
        self.hooks = hooks
        self.started = started
        self.tasks = TaskOwner(f"hooks of {started.transport} call {started.call_id}")

    def dispatch(self, event: HookEvent) -> None:
        for name, function, wants_call in self.hooks.matching(event):
            try:
                result = function(event, call=self.started) if wants_call else function(event)
                if inspect.isawaitable(result):
                    if self.tasks.closed:
                        _close(result)
                        log.warning("hook %s (%s) on %s: the call's hooks are closed; not run",
                                    name, _name(function), event.kind)
                        continue
                    self.tasks.spawn(self._run(name, function, event, result), name=f"hook {name}")
            except Exception:
                log.exception("hook %s (%s) failed on %s of %s call %s", name, _name(function), event.kind,
                              self.started.transport, self.started.call_id)

    async def _run(self, name: str, function: Hook, event: HookEvent, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hook %s (%s) failed on %s of %s call %s", name, _name(function), event.kind,
                          self.started.transport, self.started.call_id)

    async def end(self, grace_s: float) -> None:
        """Let the running hooks finish within ``grace_s``, then cancel the rest (and say so)."""
        running = self.tasks.all_tasks()
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            if pending:
                log.warning("%s: %d hook(s) still running %g s after the call ended; cancelled",
                            self.tasks.name, len(pending), grace_s)
        await self.tasks.aclose()


def _name(function: Hook) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _close(awaitable: Awaitable[Any]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
