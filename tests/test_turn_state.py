"""The turn state machine: every row of the table, and a refused transition."""
from __future__ import annotations

import pytest

from sub300.agent.events import StateChanged, event_to_dict
from sub300.agent.turn_state import TRANSITIONS, IllegalTransition, TurnEvent, TurnState, TurnStateMachine, next_state


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS), ids=lambda x: x.value)
def test_every_transition_of_the_table(state, event):
    machine = TurnStateMachine(state)
    changed = machine.fire(event)
    assert machine.state is TRANSITIONS[(state, event)]
    assert changed is (machine.state is not state)


def test_the_table_covers_the_caller_and_agent_cycle():
    machine = TurnStateMachine()
    seen = [machine.state]
    for event in (TurnEvent.SPEECH_STARTED, TurnEvent.SPEECH_ENDED, TurnEvent.ANSWER_STARTED,
                  TurnEvent.AGENT_AUDIBLE, TurnEvent.ANSWER_DONE):
        machine.fire(event)
        seen.append(machine.state)
    assert [s.value for s in seen] == ["listening", "caller_speaking", "thinking", "thinking",
                                       "agent_speaking", "listening"]


def test_an_illegal_transition_is_refused_and_leaves_the_state():
    machine = TurnStateMachine(TurnState.LISTENING)
    with pytest.raises(IllegalTransition, match="speech_ended cannot happen while listening"):
        machine.fire(TurnEvent.SPEECH_ENDED)
    assert machine.state is TurnState.LISTENING
    with pytest.raises(IllegalTransition):
        next_state(TurnState.CALLER_SPEAKING, TurnEvent.SPEECH_STARTED)


def test_only_the_illegal_pairs_are_missing():
    missing = {(s, e) for s in TurnState for e in TurnEvent} - TRANSITIONS.keys()
    assert missing == {(TurnState.CALLER_SPEAKING, TurnEvent.SPEECH_STARTED)} | {
        (s, TurnEvent.SPEECH_ENDED) for s in TurnState if s is not TurnState.CALLER_SPEAKING}


def test_several_events_of_one_moment_are_one_change():
    machine = TurnStateMachine(TurnState.CALLER_SPEAKING)
    # the caller stops while the agent is audible: no flash of "thinking"
    assert machine.fire(TurnEvent.SPEECH_ENDED, None, TurnEvent.AGENT_AUDIBLE)
    assert machine.state is TurnState.AGENT_SPEAKING
    assert not machine.fire(TurnEvent.ANSWER_STARTED, TurnEvent.AGENT_AUDIBLE)


def test_the_wire_values_are_kept():
    assert [s.value for s in TurnState] == ["listening", "caller_speaking", "thinking", "agent_speaking"]
    assert event_to_dict(StateChanged(TurnState.THINKING)) == {"state": "thinking", "kind": "state"}
