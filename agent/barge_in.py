"""Barge-in: is the caller's voice while the agent speaks an interruption?

One `BargeIn` per occurrence.  The conversation pauses the agent's audio the
moment the caller's voice starts (voice onset) and creates one; from then on
the policy only *decides*, from a clock and what the endpointer and STT
report, and the conversation carries the decision out:

    UNDECIDED ──enough voiced speech (or words that are no backchannel)──▶ COMMITTED
        │                                                                 (flush audio, cancel the reply)
        └──a short run, then quiet for resume_after_ms; or a backchannel──▶ RESUMED
                                                                          (play on from the cut segment)

* ≥ ``min_speech_ms`` of voiced speech commits at once, or — with
  ``require_words`` — asks for a transcript (`Action.CHECK_WORDS`) and
  commits if it holds words that are not a backchannel;
* a run too short to be a turn (a click, a cough) resumes once the line was
  quiet for ``resume_after_ms``;
* a short turn ("Stop." / "mm-hmm") waits for its final transcript: words
  commit, a backchannel or nothing resumes.

Ideas from pipecat's interruption strategies (minimum words) and LiveKit
Agents' false-interruption resume; the rules and numbers are ours
(config `interrupt.*`).
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .words import has_words, is_backchannel


class BargeInState(enum.StrEnum):
    UNDECIDED = "undecided"
    COMMITTED = "committed"
    RESUMED = "resumed"


class Action(enum.StrEnum):
    """What the conversation must do after an event."""

    COMMIT = "commit"            # an interruption: flush the agent's audio, cancel its reply
    RESUME = "resume"            # a false start: play the paused audio on (rewound)
    CHECK_WORDS = "check_words"  # transcribe what was said so far and call `words()` with it


@dataclass(frozen=True)
class BargeInRules:
    min_speech_ms: float      # voiced speech that interrupts
    require_words: bool       # ... only if it transcribes to words that are no backchannel
    resume_after_ms: float    # quiet after a short voice run that resumes the agent


class BargeIn:
    """One barge-in, from voice onset to its decision.

    ``onset``: arrival time of the first voiced sample (clock seconds);
    ``paused_at``: when the agent's audio was paused (clock seconds);
    ``reply``: the reply being spoken, cancelled on commit (opaque here).
    """

    def __init__(self, rules: BargeInRules, *, onset: float, paused_at: float, reply: Any = None):
        self.rules = rules
        self.onset = onset
        self.paused_at = paused_at
        self.reply = reply
        self.state = BargeInState.UNDECIDED
        self._word_check_asked = False
        self._awaiting_words = 0        # final transcripts of short turns that will decide

    @property
    def decided(self) -> bool:
        return self.state is not BargeInState.UNDECIDED

    @property
    def committed(self) -> bool:
        return self.state is BargeInState.COMMITTED

    # ------------------------------------------------------------ events
    def voiced(self, spoken_ms: float, sounds_like_speech: Callable[[], bool] | None = None) -> Action | None:
        """The caller's turn holds ``spoken_ms`` of voiced speech so far (called every frame).

        ``sounds_like_speech``: asked once, when ``min_speech_ms`` is reached; a voiced run that
        is a steady sound (line noise, a tone: speech_guard.py) does not commit on its length
        alone but goes to the word check, like ``require_words``.
        """
        if self.decided or spoken_ms < self.rules.min_speech_ms:
            return None
        if (not self.rules.require_words and not self._word_check_asked
                and (sounds_like_speech is None or sounds_like_speech())):
            return self._decide(Action.COMMIT)
        if not self._word_check_asked:
            self._word_check_asked = True
            return Action.CHECK_WORDS
        return None

    def turn_ended(self) -> None:
        """A turn ended undecided: its final transcript will decide (see `words(final=True)`)."""
        if not self.decided:
            self._awaiting_words += 1

    def words(self, text: str, *, final: bool, caller_in_turn: bool) -> Action | None:
        """A transcript arrived ("" if it failed): the word check, or (``final``) a short turn's final one.

        ``caller_in_turn``: the caller has started another turn since (its speech decides then).
        """
        if final:
            self._awaiting_words -= 1
        if self.decided:
            return None
        if has_words(text) and not is_backchannel(text):
            return self._decide(Action.COMMIT)
        if final and self._awaiting_words == 0 and not caller_in_turn:
            return self._decide(Action.RESUME)   # a cough, a click or "mm-hmm"
        return None

    def quiet(self, now: float, last_voiced: float, *, caller_in_turn: bool) -> Action | None:
        """Called every frame: resume after a voice run too short to become a turn, once quiet long enough.

        ``last_voiced``: arrival of the last voiced frame (clock seconds).
        """
        if self.decided or self._awaiting_words or caller_in_turn:
            return None
        if (now - max(last_voiced, self.paused_at)) * 1000 >= self.rules.resume_after_ms:
            return self._decide(Action.RESUME)
        return None

    def _decide(self, action: Action) -> Action:
        self.state = BargeInState.COMMITTED if action is Action.COMMIT else BargeInState.RESUMED
        return action
