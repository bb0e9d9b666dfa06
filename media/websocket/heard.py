"""A playout queue that knows what the far end has actually played: sent audio counts once confirmed.

A WebSocket media stream (Twilio Media Streams and its kin) buffers the
agent's audio at the provider, so the server sends a little ahead of the
caller's ear.  `PlayoutQueue` counts audio as played when the transport
pulls it; here the transport *sends* what it pulls, and what was sent is
only *heard* once the provider says so (Twilio echoes a ``mark`` when the
audio before it has played).  Each pulled frame is kept, with the segments
and offsets it came from, as an unconfirmed send numbered ``seq``:

* `confirm(seq)` — the provider played everything up to frame ``seq`` (the
  mark came back): those frames are final;
* `pause()` / `flush()` / `hold()` (barge-in, the end of a reply, a call
  limit) first *unsend* every unconfirmed frame: the samples go back to the
  front of the queue (the segments' offsets are rewound, popped segments put
  back) and leave the played counts (``played_fraction``, ``played_total``),
  so barge-in truncation keeps in the history only what the marks confirmed;
  ``on_unsent(samples)`` then tells the transport to flush the provider's
  buffer (Twilio ``clear``) — whenever audio went out since the last time,
  even with nothing taken back (a transport without marks: the client's own
  buffer is flushed, though the history counted it as heard).  A false interruption resumes from the start of
  the cut segment, as with any other transport (the caller heard nothing of
  the unconfirmed audio: the clear dropped it).

The estimate is conservative: a frame that played while its mark was on its
way back counts as unheard (at most one network trip of audio, ~20-100 ms).
A stream whose marks never come back (a client that does not echo them)
would grow the list: beyond `MAX_UNCONFIRMED` frames the oldest are taken as
heard, logged once per call.  A transport without marks confirms each frame
as it sends it (`PlayoutQueue`'s own counting).

The first frame of each turn's reply is noted (``first_seq``), so the
transport learns when the caller started hearing it: `confirm` returns the
turns whose first frame it confirmed, each once.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sub300.agent.playout import PlayoutQueue

log = logging.getLogger(__name__)
#: unconfirmed frames kept at most (20 ms each: 10 s); older ones count as heard
MAX_UNCONFIRMED = 500


@dataclass
class _Sent:
    seq: int
    #: (segment, its offset before this frame, samples this frame took from it)
    chunks: list[tuple[Any, int, int]]


@dataclass
class HeardPlayout(PlayoutQueue):
    """`PlayoutQueue` whose played counts follow the far end's confirmations (see the module docstring).

    ``on_unsent(samples)``: called on a pause, flush or hold when audio went out since the last call, with
    the number of samples taken back (0 without marks), so the transport clears the far end's buffer.
    """

    on_unsent: Callable[[int], None] | None = None
    _unconfirmed: deque[_Sent] = field(default_factory=deque)
    _seq: int = 0
    #: turn -> the seq of the first frame that carried its audio
    first_seq: dict[int, int] = field(default_factory=dict)
    #: turns whose first frame the far end confirmed (`confirm` returned them once)
    heard_turns: set[int] = field(default_factory=set)
    #: samples taken back so far (unsent after a pause, flush or hold)
    unsent_total: int = 0
    _overflow_logged: bool = False
    _sent_since_clear: bool = False   # audio went out since the last `on_unsent`: the far end may buffer some

    @property
    def last_seq(self) -> int:
        """The number of the last frame `pull` returned (0 before the first)."""
        return self._seq

    @property
    def unconfirmed_samples(self) -> int:
        return sum(taken for sent in self._unconfirmed for _seg, _start, taken in sent.chunks)

    def pull(self, n: int) -> np.ndarray | None:
        before: list[tuple[Any, int]] = []
        remaining = 0
        for seg in self._segments:
            if remaining >= n:
                break
            before.append((seg, seg.offset))
            remaining += len(seg.pcm) - seg.offset
        out = super().pull(n)
        if out is None:
            return None
        chunks = [(seg, start, seg.offset - start) for seg, start in before if seg.offset > start]
        self._seq += 1
        for seg, _start, _taken in chunks:
            if seg.turn not in self.heard_turns:
                self.first_seq.setdefault(seg.turn, self._seq)
        self._unconfirmed.append(_Sent(self._seq, chunks))
        self._sent_since_clear = True
        if len(self._unconfirmed) > MAX_UNCONFIRMED:
            if not self._overflow_logged:
                self._overflow_logged = True
                log.warning("the far end confirmed none of the last %d frames (no marks back): older frames "
                            "now count as heard", MAX_UNCONFIRMED)
            self._unconfirmed.popleft()
        return out

    def confirm(self, seq: int) -> list[int]:
        """Frames up to ``seq`` were played; returns the turns whose first frame is among them."""
        if not self._unconfirmed or seq < self._unconfirmed[0].seq:
            return []   # already confirmed, or taken back (a mark echoed after a clear)
        while self._unconfirmed and self._unconfirmed[0].seq <= seq:
            self._unconfirmed.popleft()
        heard = [turn for turn, first in self.first_seq.items() if first <= seq]
        for turn in heard:
            del self.first_seq[turn]
            self.heard_turns.add(turn)
        return heard

    def unsend(self) -> int:
        """Take back every unconfirmed frame (see the module docstring); returns the samples taken back."""
        taken_back = 0
        confirmed_upto = self._confirmed_upto
        while self._unconfirmed:
            sent = self._unconfirmed.pop()
            for seg, start, taken in reversed(sent.chunks):
                if not (self._segments and self._segments[0] is seg):
                    self._segments.appendleft(seg)
                seg.offset = start
                counts = self._pieces.get((seg.turn, seg.piece))
                if counts is not None:
                    counts[0] = max(0, counts[0] - taken)
                self.played_total = max(0, self.played_total - taken)
                taken_back += taken
        for turn in [t for t, first in self.first_seq.items() if first > confirmed_upto]:
            del self.first_seq[turn]   # nothing of this turn was confirmed: its first frame is still to come
        if self._segments:
            self._idle.clear()
        self.unsent_total += taken_back
        if self._sent_since_clear and self.on_unsent is not None:
            self.on_unsent(taken_back)
        self._sent_since_clear = False
        return taken_back

    @property
    def _confirmed_upto(self) -> int:
        """The last seq confirmed: everything before the oldest unconfirmed frame (or every frame sent)."""
        return self._unconfirmed[0].seq - 1 if self._unconfirmed else self._seq

    def pause(self) -> None:
        if not self.paused:
            self.unsend()
        super().pause()

    def hold(self) -> None:
        self.unsend()
        super().hold()

    def flush(self) -> int:
        self.unsend()
        return super().flush()
