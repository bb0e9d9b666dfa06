"""Call limits: a silent caller or an endless call does not hold a slot forever.

Two limits, from ``[call]`` in the configuration (`CallConfig`), for every
transport that runs a `Conversation` (WebRTC, SIP; the file transport's
input ends by itself):

* **inactivity** — no caller speech and no agent work (a turn spoken,
  transcribed, answered or played) for ``inactivity_timeout_s`` seconds;
* **maximum length** — ``max_duration_s`` seconds since the call started,
  whatever is going on.

Either one fires once: the conversation stops answering, says the limit's
goodbye line (TTS, into its playout) and, once that has been played, emits
`HangupRequested` — the same event a caller's "goodbye" produces, so each
transport hangs up the way it already does (BYE for SIP, close for WebRTC).

The check is a pure function of the clock (`CallLimits.expired`): the
conversation runs it on every caller frame (`Conversation.check_limits`),
and a transport whose caller may send no frames at all (SIP on hold,
WebRTC with RTP stopped) calls it from its own timer too.  No task of its
own, so virtual-time tests drive it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import CallConfig

INACTIVITY = "inactivity"
MAX_DURATION = "max_duration"


@dataclass(frozen=True)
class LimitReached:
    """Which limit fired (``reason``: "inactivity" | "max_duration"), when (clock s), and the line to say."""

    reason: str
    at: float
    goodbye: str


@dataclass
class CallLimits:
    """The inactivity and maximum-length clocks of one call (seconds on the conversation's clock).

    ``inactivity_s`` / ``max_duration_s`` of 0 switch that limit off.
    `activity(now)` restarts the inactivity clock; `expired(now)` returns the
    first limit reached (maximum length wins a tie), or None.
    """

    inactivity_s: float
    max_duration_s: float
    started: float
    inactivity_goodbye: str = ""
    max_duration_goodbye: str = ""
    last_activity: float | None = None

    @classmethod
    def from_config(cls, config: CallConfig, now: float) -> CallLimits:
        return cls(config.inactivity_timeout_s, config.max_duration_s, now,
                   config.inactivity_goodbye, config.max_duration_goodbye)

    def activity(self, now: float) -> None:
        """The caller spoke or the agent worked at ``now``."""
        if self.last_activity is None or now > self.last_activity:
            self.last_activity = now

    def expired(self, now: float) -> LimitReached | None:
        if self.max_duration_s > 0 and now - self.started >= self.max_duration_s:
            return LimitReached(MAX_DURATION, now, self.max_duration_goodbye)
        since = self.started if self.last_activity is None else self.last_activity
        if self.inactivity_s > 0 and now - since >= self.inactivity_s:
            return LimitReached(INACTIVITY, now, self.inactivity_goodbye)
        return None

    def next_deadline(self) -> float | None:
        """The earliest clock time at which `expired` may fire (None: both limits off)."""
        deadlines = []
        if self.max_duration_s > 0:
            deadlines.append(self.started + self.max_duration_s)
        if self.inactivity_s > 0:
            since = self.started if self.last_activity is None else self.last_activity
            deadlines.append(since + self.inactivity_s)
        return min(deadlines, default=None)
