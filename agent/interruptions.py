"""Barge-in, carried out: the agent's audio paused, flushed or resumed as the policy decides.

`BargeIn` (barge_in.py) only decides; this is where a decision touches the
call — the playout queue and the reply being spoken — and is reported
(`BargeInEvent`, the turn state, the reaction times the benchmarks read).
One per call; at most one barge-in is undecided at a time (`current`).

Like pipecat's interruption frames, a barge-in works in two steps: the
agent falls silent at the caller's voice onset (`PlayoutQueue.pause`, the
fast path the reaction time measures), and the decision — interrupt (flush,
cancel the reply, keep in the history only what was heard) or resume
(rewind to the start of the cut segment) — comes later.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from .barge_in import Action, BargeIn, BargeInRules
from .events import BargeInEvent, EventHandler
from .playout import PlayoutQueue
from .reply import Reply
from .turn import Turn
from .turn_state import TurnEvent as E

log = logging.getLogger(__name__)


class Interruptions:
    """``enabled``: the caller may interrupt (interrupt.mode == "barge_in");
    ``caller_in_turn()``: the caller is speaking a turn now; ``advance`` fires turn-state events."""

    def __init__(self, rules: BargeInRules, *, enabled: bool, playout: PlayoutQueue, clock: Callable[[], float],
                 emit: EventHandler, advance: Callable[..., None], caller_in_turn: Callable[[], bool]):
        self._rules, self._enabled, self._playout, self._clock = rules, enabled, playout, clock
        self._emit, self._advance, self._caller_in_turn = emit, advance, caller_in_turn
        self.current: BargeIn | None = None      # the undecided barge-in, if any
        #: (voice onset, agent silent) of every barge-in, committed or not, for tests and benchmarks
        self.barge_ins: list[tuple[float, float]] = []
        self.false_interruptions = 0
        self.closed = False

    # ------------------------------------------------------------ from the endpointer
    def voice_onset(self, onset: float, reply: Reply | None) -> None:
        """Caller voice (``onset``: arrival of its first sample) while the agent is audible: pause at once."""
        if self.current is None and self._playout.audible and self._enabled:
            self._playout.pause()
            self.current = BargeIn(self._rules, onset=onset, paused_at=self._clock(), reply=reply)
            log.debug("voice while the agent speaks: paused")
            self._emit(BargeInEvent("paused", None))

    def speech_started(self, onset: float, reply: Reply | None) -> BargeIn | None:
        """A caller turn began; returns the barge-in it must decide, if any."""
        if self.current is None and reply is not None and self._enabled:
            # The agent was thinking (no audio yet) and the caller goes on talking.
            self.current = BargeIn(self._rules, onset=onset, paused_at=self._clock(), reply=reply)
        return self.current

    def voiced(self, turn: Turn, spoken_ms: float, sounds_like_speech: Callable[[], bool] | None = None) -> None:
        """The turn's voiced speech so far (every frame while it is spoken); see `BargeIn.voiced`."""
        if turn.barge_in is not None:
            self._act(turn.barge_in, turn.barge_in.voiced(spoken_ms, sounds_like_speech), turn, "caller speech")

    def turn_ended(self, turn: Turn) -> None:
        """Short speech while the agent talked: "Stop." interrupts, a cough or an "mm-hmm" does not.
        The final transcript decides; the agent stays paused till then."""
        barge = turn.barge_in
        if barge is not None and not barge.decided and turn.transcription is not None:
            barge.turn_ended()
            turn.transcription.then(lambda text: self._words(turn, barge, text, final=True))

    def tick(self, now: float, last_voiced: float, *, caller_in_turn: bool) -> None:
        """Every frame: a voice run too short to be a turn resumes the agent after a quiet while."""
        if self.current is not None:
            self._act(self.current, self.current.quiet(now, last_voiced, caller_in_turn=caller_in_turn))

    # ------------------------------------------------------------ decisions
    def _words(self, turn: Turn, barge: BargeIn, text: str | None, *, final: bool) -> None:
        text = (text or "").strip()
        action = barge.words(text, final=final, caller_in_turn=self._caller_in_turn())
        if action is Action.RESUME:
            turn.ledger.notes["backchannel"] = text
        self._act(barge, action, turn, f"caller said {text!r}")

    def _act(self, barge: BargeIn, action: Action | None, turn: Turn | None = None, why: str = "") -> None:
        if action is None or self.closed:
            return
        if action is Action.CHECK_WORDS:
            assert turn is not None, "a word check needs the turn being spoken"
            check = turn.stt.transcribe_now()
            check.then(lambda text: self._words(turn, barge, text, final=False))
            return
        if self.current is barge:
            self.current = None
        playout = self._playout
        if action is Action.COMMIT:
            dropped = playout.flush()
            if barge.reply is not None:
                barge.reply.interrupted = True
                barge.reply.cancel()
            log.info("barge-in (%s): dropped %.2f s of agent audio", why, dropped / playout.sample_rate)
        else:
            self.false_interruptions += 1
            playout.resume(rewind=True)
            log.info("false interruption: the agent resumes")
        self.barge_ins.append((barge.onset, playout.silenced_at or barge.paused_at))
        reaction_ms = round((self.barge_ins[-1][1] - barge.onset) * 1000, 1)
        self._emit(BargeInEvent("interrupted" if action is Action.COMMIT else "resumed", reaction_ms))
        self._advance(E.AGENT_SILENCED if action is Action.COMMIT else E.AGENT_AUDIBLE if playout.audible else None)
