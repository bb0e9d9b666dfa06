"""Adaptive end of turn: at each pause, a hangover chosen by how complete the turn sounds.

A fixed hangover (`vad.hangover_ms`, 250 ms) both cuts off callers who pause
mid-sentence and makes everyone else wait.  With ``turn.detector =
"smart-turn"`` the endpointer starts every pause with the long hangover
(`turn.incomplete_hangover_ms`) and this policy shortens or keeps it
(`Endpointer.decide_hangover`, agent/endpointing.py):

* at the silence onset (`SpeechPaused`) the turn's audio so far is scored by
  a `TurnCompletionModel` (Smart Turn v3.2, models/turn_smart.py) in a worker
  thread; P(complete) >= `turn.threshold` gives the short hangover
  (`turn.complete_hangover_ms`), below it the long one.  Both count from the
  true end of speech; a decision that arrives after the short hangover has
  elapsed ends the turn at once;
* the early-final transcript (agent/transcription.py), when it is known
  inside the silence: a text that ends mid-phrase (`ends_mid_phrase`: a comma,
  a conjunction, an article, a preposition, a filler) makes the turn
  incomplete whatever the model said — the transcript can only lengthen;
* a model that fails: logged as a warning, noted in the ledger
  (``turn_model_error``), and that pause falls back to the VAD hangover
  (`vad.hangover_ms`); the transcript rule still applies.

The early transcription and the speculative reply start at the pause as
before, so they keep running inside the long hangover.  Ledger notes of the
pause that ended the turn: ``turn_p`` (the model's probability),
``turn_model_ms`` (its inference time), ``turn_decision_ms`` (from the pause to
the decision, on the conversation's clock: the worker thread's wait included),
``hangover_ms`` (the hangover chosen) and ``hangover_by`` (``model`` |
``transcript`` | ``vad: model failed`` | ``undecided``: the long hangover ran out
before the model answered); ``turn_pauses`` counts the turn's pauses.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sub300.models.protocols import TurnCompletionModel

from .config import Config
from .tasks import TaskOwner

log = logging.getLogger(__name__)
Clock = Callable[[], float]

#: Words after which an English sentence cannot end: articles, possessive determiners,
#: coordinating and subordinating conjunctions, common prepositions, fillers.  (A question may
#: end on a preposition, "what is it for?", so a text ending in "?" or "!" is never mid-phrase.)
_MID_PHRASE_TEXT = """
a an the my your his her its our their this these those
and or but nor so because if that than when while although though unless until whether as since
of to in on at for with from by about into onto over under after before between through during
without within upon via per toward towards against among around like
um uh er erm hmm
"""
MID_PHRASE_WORDS = frozenset(_MID_PHRASE_TEXT.split())
#: punctuation a sentence does not end on
MID_PHRASE_MARKS = (",", ";", ":", "-", "\u2013", "\u2014")
_WORD = re.compile(r"[a-z']+")


def ends_mid_phrase(text: str) -> bool:
    """True when ``text`` (a transcript) visibly stops inside a phrase: it ends on a comma, a
    semicolon, a colon or a dash, or its last word is one of `MID_PHRASE_WORDS` (whatever
    full stop the recogniser put after it)."""
    text = text.strip()
    if not text or text.endswith(("?", "!")):
        return False
    if text.endswith(MID_PHRASE_MARKS):
        return True
    words = _WORD.findall(text.lower())
    return bool(words) and words[-1] in MID_PHRASE_WORDS


@dataclass(frozen=True)
class TurnTiming:
    """The policy's settings (config section ``[turn]``, and ``vad.hangover_ms`` for a failing model)."""

    threshold: float
    complete_ms: int
    incomplete_ms: int
    fallback_ms: int
    transcript: bool = True

    @classmethod
    def from_config(cls, config: Config) -> TurnTiming:
        t = config.turn
        return cls(t.threshold, t.complete_hangover_ms, t.incomplete_hangover_ms, config.vad.hangover_ms, t.transcript)


async def completion_probability(model: TurnCompletionModel, audio: np.ndarray, clock: Clock) -> tuple[float, float]:
    """(P(complete) of ``audio``, inference ms) without blocking the event loop: `probability` in a worker
    thread, timed there (wall clock, the thread's queueing excluded); a model with its own coroutine
    ``probability_async`` (a remote model, a test fake on virtual time) is awaited and timed on ``clock``."""
    native = getattr(model, "probability_async", None)
    if native is not None:
        started = clock()
        probability = float(await native(audio))
        return probability, (clock() - started) * 1000

    def timed() -> tuple[float, float]:
        t0 = time.perf_counter()
        p = float(model.probability(audio))
        return p, (time.perf_counter() - t0) * 1000

    return await asyncio.to_thread(timed)


@dataclass
class _Pause:
    number: int                      # the endpointer's pause count when it began
    label: str                       # "turn 3", for logs
    notes: dict[str, Any]            # the turn's ledger notes
    started: float
    probability: float | None = None
    failed: bool = False
    mid_phrase: bool = False
    task: asyncio.Task[None] | None = None

    def hangover(self, timing: TurnTiming) -> tuple[int, str] | None:
        """(hangover ms, why), or None while nothing is known yet (the long hangover runs)."""
        if self.mid_phrase:
            return timing.incomplete_ms, "transcript"
        if self.failed:
            return timing.fallback_ms, "vad: model failed"
        if self.probability is None:
            return None
        if self.probability >= timing.threshold:
            return timing.complete_ms, "model"
        return timing.incomplete_ms, "model"


class EndOfTurn:
    """One call's adaptive end-of-turn policy.

    ``decide(hangover_ms, pause)`` is called whenever the hangover of pause
    number ``pause`` is chosen or changes (the conversation passes it to
    `Endpointer.decide_hangover`, which may end the turn at once).
    """

    def __init__(self, model: TurnCompletionModel, timing: TurnTiming, *, clock: Clock,
                 decide: Callable[[int, int], None]):
        self.model, self.timing = model, timing
        self._clock, self._decide = clock, decide
        self._pause: _Pause | None = None

    def paused(self, pause: int, audio: np.ndarray, *, notes: dict[str, Any], owner: TaskOwner, label: str) -> None:
        """A silence began (pause number ``pause``): score ``audio`` (float32 16 kHz, the turn so far)."""
        self.resumed()
        current = self._pause = _Pause(pause, label, notes, self._clock())
        notes["turn_pauses"] = notes.get("turn_pauses", 0) + 1
        notes["hangover_ms"], notes["hangover_by"] = self.timing.incomplete_ms, "undecided"
        current.task = owner.spawn(self._score(current, audio), name="end-of-turn")

    def resumed(self) -> None:
        """The caller spoke again (or the turn ended): the pause's decision no longer matters."""
        pause, self._pause = self._pause, None
        if pause is not None and pause.task is not None and not pause.task.done():
            pause.task.cancel()

    def transcript(self, text: str) -> None:
        """The early-final transcript of the current pause is known."""
        pause = self._pause
        if pause is None or not self.timing.transcript or not ends_mid_phrase(text):
            return
        pause.mid_phrase = True
        self._apply(pause)

    async def _score(self, pause: _Pause, audio: np.ndarray) -> None:
        try:
            probability, inference_ms = await completion_probability(self.model, audio, self._clock)
        except asyncio.CancelledError:
            raise
        except Exception as error:   # any failure: logged, noted, the VAD hangover for this pause
            pause.failed = True
            pause.notes["turn_model_error"] = getattr(error, "kind", type(error).__name__)
            log.warning("%s: turn model %s failed (%s); this pause ends after the VAD hangover (%d ms)",
                        pause.label, self.model.name, error, self.timing.fallback_ms)
        else:
            pause.probability = probability
            pause.notes["turn_p"] = round(probability, 3)
            pause.notes["turn_model_ms"] = round(inference_ms, 1)
        pause.notes["turn_decision_ms"] = round((self._clock() - pause.started) * 1000, 1)
        if self._pause is pause:
            self._apply(pause)

    def _apply(self, pause: _Pause) -> None:
        decided = pause.hangover(self.timing)
        if decided is None:
            return
        pause.notes["hangover_ms"], pause.notes["hangover_by"] = decided
        self._decide(decided[0], pause.number)
