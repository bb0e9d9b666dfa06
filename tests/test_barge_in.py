"""The barge-in policy on its own: a clock and events, no engines."""
from __future__ import annotations

import pytest

from sub300.agent.barge_in import Action, BargeIn, BargeInRules, BargeInState
from sub300.agent.words import has_words, is_backchannel, said_phrase

RULES = BargeInRules(min_speech_ms=300, require_words=False, resume_after_ms=600)


def barge(rules=RULES) -> BargeIn:
    return BargeIn(rules, onset=10.0, paused_at=10.06)


def test_enough_voiced_speech_commits_once():
    b = barge()
    assert b.voiced(100) is None and b.voiced(299.9) is None
    assert b.state is BargeInState.UNDECIDED
    assert b.voiced(300) is Action.COMMIT
    assert b.state is BargeInState.COMMITTED and b.committed and b.decided
    assert b.voiced(500) is None                       # decided once
    assert b.quiet(20.0, 10.0, caller_in_turn=False) is None


def test_with_require_words_speech_asks_for_words_and_words_commit():
    b = barge(BargeInRules(300, True, 600))
    assert b.voiced(300) is Action.CHECK_WORDS
    assert b.voiced(400) is None                       # asked once
    assert b.words("mm-hmm", final=False, caller_in_turn=True) is None
    assert b.words(" Stop.", final=False, caller_in_turn=True) is Action.COMMIT
    assert b.committed


def test_a_steady_sound_as_long_as_speech_does_not_commit_by_length():
    """Line noise or a tone lifted into the detector (a quiet line): its words decide, asked once."""
    asked = []

    def steady() -> bool:
        asked.append(True)
        return False

    b = barge()
    assert b.voiced(299, steady) is None and not asked        # not asked before the threshold
    assert b.voiced(300, steady) is Action.CHECK_WORDS
    assert b.voiced(600, steady) is None and len(asked) == 1  # asked once
    assert b.state is BargeInState.UNDECIDED
    b.turn_ended()
    assert b.words("", final=True, caller_in_turn=False) is Action.RESUME   # no words: the agent resumes


def test_speech_that_sounds_like_speech_commits_by_length():
    assert barge().voiced(300, lambda: True) is Action.COMMIT


def test_a_short_voice_run_resumes_after_quiet():
    b = barge()
    # last voiced frame at 10.08; quiet is counted from the later of that and the pause
    assert b.quiet(10.67, 10.08, caller_in_turn=False) is None
    assert b.quiet(10.70, 10.08, caller_in_turn=True) is None      # a turn has begun: its speech decides
    assert b.quiet(10.69, 10.08, caller_in_turn=False) is Action.RESUME
    assert b.state is BargeInState.RESUMED and not b.committed


def test_a_short_turn_waits_for_its_transcript():
    b = barge()
    b.turn_ended()
    assert b.quiet(30.0, 10.1, caller_in_turn=False) is None        # the transcript will decide
    assert b.words("Mm-hmm.", final=True, caller_in_turn=False) is Action.RESUME


def test_a_short_turn_with_words_commits():
    b = barge()
    b.turn_ended()
    assert b.words("Stop.", final=True, caller_in_turn=False) is Action.COMMIT


def test_a_failed_or_empty_transcript_resumes_only_when_nothing_else_is_said():
    b = barge()
    b.turn_ended()
    b.turn_ended()
    assert b.words("", final=True, caller_in_turn=False) is None    # another short turn still to come
    assert b.words("", final=True, caller_in_turn=True) is None     # and the caller speaks again
    b.turn_ended()
    assert b.words("", final=True, caller_in_turn=False) is Action.RESUME


@pytest.mark.parametrize("text", ["mm-hmm", "Uh huh.", "Yeah!", "okay", " you", "I see."])
def test_backchannels(text):
    assert is_backchannel(text)


@pytest.mark.parametrize("text", ["Stop.", "yeah but no", "What?"])
def test_not_backchannels(text):
    assert not is_backchannel(text)


def test_words_and_phrases():
    assert has_words(" 42 ") and not has_words(" ... ")
    assert said_phrase("Okay, Good-bye!", ["goodbye", "good bye"]) == "good bye"
    assert said_phrase("Goodbyes are hard", ["goodbye"]) is None
