"""The turn state a caller sees, as an explicit state machine.

The main cycle (`TRANSITIONS` below has every move):

    listening ──speech_started──▶ caller_speaking ──speech_ended──▶ thinking
        ▲                               ▲                             │
        │                               └──── speech_started ─────────┤ agent_audible
        └────────── answer_done ─────────── agent_speaking ◀──────────┘

The state is what the demo page shows (`StateChanged` carries its value), so
the caller's voice wins: while the caller holds a turn the state stays
`caller_speaking` whatever the agent does meanwhile (its audio may be paused
by a barge-in, or start during a turn that has not been decided yet).

Every legal move is one row of `TRANSITIONS`; `next_state` refuses any other
with `IllegalTransition`.  The conversation fires the events; several events
of one moment go through `TurnStateMachine.fire` together, so the outside
sees one change (e.g. the caller stops while the agent is audible:
speech_ended + agent_audible → agent_speaking, never a flash of thinking).

Vocabulary after LiveKit Agents' agent/user states (listening, thinking,
speaking), folded into the one state our page shows.
"""
from __future__ import annotations

import enum


class TurnState(enum.StrEnum):
    LISTENING = "listening"
    CALLER_SPEAKING = "caller_speaking"
    THINKING = "thinking"
    AGENT_SPEAKING = "agent_speaking"


class TurnEvent(enum.StrEnum):
    SPEECH_STARTED = "speech_started"    # the endpointer opened a caller turn
    SPEECH_ENDED = "speech_ended"        # the caller's turn ended and was queued for an answer
    TURN_QUEUED = "turn_queued"          # a caller turn waits for an answer (keypad entry; the next queued turn)
    ANSWER_STARTED = "answer_started"    # the responder took a turn from the queue
    AGENT_AUDIBLE = "agent_audible"      # agent audio plays: first audio out, held audio released, resumed
    AGENT_SILENCED = "agent_silenced"    # a committed barge-in flushed the agent's audio
    ANSWER_DONE = "answer_done"          # the responder finished a turn (answered, discarded or failed)


class IllegalTransition(RuntimeError):
    """An event that cannot happen in the current state (a bug in whoever fired it)."""


L, C, T, A = TurnState.LISTENING, TurnState.CALLER_SPEAKING, TurnState.THINKING, TurnState.AGENT_SPEAKING
E = TurnEvent

#: (state, event) → next state; anything not listed is illegal.
TRANSITIONS: dict[tuple[TurnState, TurnEvent], TurnState] = {
    (L, E.SPEECH_STARTED): C,
    (T, E.SPEECH_STARTED): C,
    (A, E.SPEECH_STARTED): C,
    (C, E.SPEECH_ENDED): T,
    (L, E.TURN_QUEUED): T,
    (T, E.TURN_QUEUED): T,
    (C, E.TURN_QUEUED): C,
    (A, E.TURN_QUEUED): A,          # a keypad entry while the agent speaks: answered after
    (L, E.ANSWER_STARTED): T,
    (T, E.ANSWER_STARTED): T,
    (C, E.ANSWER_STARTED): C,
    (A, E.ANSWER_STARTED): T,
    (L, E.AGENT_AUDIBLE): A,
    (T, E.AGENT_AUDIBLE): A,
    (A, E.AGENT_AUDIBLE): A,
    (C, E.AGENT_AUDIBLE): C,        # the caller keeps the floor on the page
    (L, E.AGENT_SILENCED): L,
    (T, E.AGENT_SILENCED): T,
    (C, E.AGENT_SILENCED): C,
    (A, E.AGENT_SILENCED): T,       # the interruption is a turn to answer
    (L, E.ANSWER_DONE): L,
    (T, E.ANSWER_DONE): L,
    (A, E.ANSWER_DONE): L,
    (C, E.ANSWER_DONE): C,
}
del L, C, T, A, E


def next_state(state: TurnState, event: TurnEvent) -> TurnState:
    """The state after ``event`` in ``state``; `IllegalTransition` if the table has no such row."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} cannot happen while {state.value}") from None


class TurnStateMachine:
    """Holds the current state; `fire` applies events and says whether the state changed."""

    def __init__(self, state: TurnState = TurnState.LISTENING):
        self.state = state

    def fire(self, *events: TurnEvent | None) -> bool:
        """Apply ``events`` in order (None is skipped); True when the final state differs from the first."""
        before = state = self.state
        for event in events:
            if event is not None:
                state = next_state(state, event)
        self.state = state
        return state is not before
