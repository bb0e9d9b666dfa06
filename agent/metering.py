"""One call's usage meter: what each turn report and the call's end carry.

Every amount the call consumes (quantities of agent/usage.py) is reported
exactly once, so the turns' ``TurnLedger.usage`` plus the closing
`CallUsage` add up to the call's totals whatever the timing:

* work done *for a turn* (STT audio of its transcriptions, the LLM tokens
  and TTS characters of its replies, a wasted speculation's included) is
  charged to that turn and goes into its report (`TurnFinished`,
  `TurnFailed`, `TurnDiscarded`);
* what lands after that turn was reported (a partial transcription that
  returns late), what belongs to no turn (the goodbye line of a call limit),
  and what a turn never reported (the turn in progress when the call ends)
  goes into the *next* report, of any turn, or into `CallUsage`;
* caller audio: the seconds received since the previous report
  (``caller_samples`` at the pipeline's 16 kHz, every frame fed, speech
  or not); agent audio: the seconds the transport pulled from the playout
  queue since the previous report (`PlayoutQueue.played_total`: what was
  played, so a barged-in reply counts its played part only).  A finished
  turn's reply has played before its `TurnFinished` (the responder waits for
  the playout), so its agent audio is in its own report; audio still
  playing at a report (after a failed turn's fallback, a goodbye) is in the
  next one.

Audio is counted in samples (integers) and turned into seconds only in a
report, so the reports' sum is the total without rounding drift.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .usage import AGENT_AUDIO_S, CALLER_AUDIO_S, add_usage


class CallMeter:
    """``played_total()``: samples the transport has pulled from the playout queue so far, at
    ``agent_rate``; ``caller_rate``: the rate of the samples given to `caller_audio`."""

    def __init__(self, played_total: Callable[[], int], agent_rate: int, caller_rate: int) -> None:
        self._played_total, self._agent_rate, self._caller_rate = played_total, agent_rate, caller_rate
        self._turns: dict[int, dict[str, float]] = {}
        self._reported: set[int] = set()
        self._pending: dict[str, float] = {}
        self._caller_samples = 0
        self._played_reported = 0
        self.closed = False
        #: every report's usage summed (for checks: equals the call's totals once closed)
        self.total: dict[str, float] = {}

    def charge(self, turn: int | None, usage: Mapping[str, float]) -> None:
        """Work done for ``turn`` (None: for no turn); it goes into that turn's report, or the next
        report if that one is made already.  Zero amounts are dropped; unknown names raise KeyError."""
        usage = {name: amount for name, amount in usage.items() if amount}
        if not usage:
            return
        if turn is None or turn in self._reported:
            add_usage(self._pending, usage)
        else:
            add_usage(self._turns.setdefault(turn, {}), usage)

    def caller_audio(self, samples: int) -> None:
        """Caller audio received (samples at ``caller_rate``)."""
        self._caller_samples += samples

    def report_turn(self, turn: int) -> dict[str, float]:
        """The usage turn ``turn``'s report carries (its own work and whatever waited for a report)."""
        self._reported.add(turn)
        out = self._drain()
        add_usage(out, self._turns.pop(turn, {}))
        return self._count(out)

    def close(self) -> dict[str, float]:
        """What the call's end carries: everything not reported yet (the turns that never reported
        theirs included).  Later charges are lost, so close after the call's work has ended."""
        self.closed = True
        out = self._drain()
        for turn in sorted(self._turns):
            add_usage(out, self._turns.pop(turn))
        return self._count(out)

    def _drain(self) -> dict[str, float]:
        out, self._pending = self._pending, {}
        if self._caller_samples:
            add_usage(out, {CALLER_AUDIO_S: self._caller_samples / self._caller_rate})
            self._caller_samples = 0
        played = self._played_total()
        if played > self._played_reported:
            add_usage(out, {AGENT_AUDIO_S: (played - self._played_reported) / self._agent_rate})
            self._played_reported = played
        return out

    def _count(self, out: dict[str, float]) -> dict[str, float]:
        add_usage(self.total, out)
        return out
