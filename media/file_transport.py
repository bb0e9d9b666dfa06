"""The file transport: a WAV (or any audio file) plays the caller, in real time.

The caller's audio is fed 20 ms at a time on the wall clock, exactly as a
phone or browser would deliver it, so the ledger's latencies are real.  The
agent's audio is pulled from the playout queue on the same 20 ms clock and
placed on a timeline at the moment it would have been heard: OUT.wav lines
up with IN.wav sample for sample.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sub300.agent.audio import AudioFrame
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.conversation import Conversation
from sub300.models.protocols import SAMPLE_RATE

from .pacing import Pacer

FRAME_MS = 20


@dataclass
class FileCallResult:
    """What a file call produced: the agent's audio where the caller would have heard it."""

    #: agent audio on the caller's timeline, at the playout rate
    timeline: np.ndarray
    sample_rate: int
    input_seconds: float
    timed_out: bool = False


@dataclass
class FileCall:
    """A conversation fed from `caller_audio` (16 kHz mono int16) in real time, 20 ms per tick."""

    conversation: Conversation
    caller_audio: np.ndarray
    #: keep the line open after the file ends until the agent is done, at most this long
    max_tail_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _timeline: list[np.ndarray] = field(default_factory=list)

    async def run(self) -> FileCallResult:
        """Play the file to the conversation, 20 ms per tick, then stay on the line until the agent is done.

        Returns the agent's audio on the caller's timeline; ``timed_out`` when
        the agent was still busy ``max_tail_s`` after the file ended.
        """
        frame = SAMPLE_RATE * FRAME_MS // 1000
        playout = self.conversation.playout
        out_frame = playout.sample_rate * FRAME_MS // 1000
        silence = np.zeros(frame, np.int16)
        n_frames = -(-len(self.caller_audio) // frame)
        tail_limit = n_frames + int(self.max_tail_s * 1000 / FRAME_MS)
        i = 0

        def tick(deadline: float) -> str | None:
            nonlocal i
            # Agent audio that plays during this 20 ms slot.
            pulled = playout.pull(out_frame)
            self._timeline.append(pulled if pulled is not None else np.zeros(out_frame, np.int16))
            # Caller audio whose last sample arrives at this deadline.
            if i < n_frames:
                chunk = self.caller_audio[i * frame:(i + 1) * frame]
                if len(chunk) < frame:
                    chunk = np.concatenate([chunk, silence[: frame - len(chunk)]])
            else:
                chunk = silence  # the caller stays on the line, silent, while the agent answers
                if not self.conversation.busy:
                    return "done"
                if i >= tail_limit:
                    return "timed out"
            self.conversation.push_frame(AudioFrame(chunk, deadline))
            i += 1
            return None

        ending = await Pacer(FRAME_MS / 1000, self.clock).run(tick)
        return FileCallResult(np.concatenate(self._timeline), playout.sample_rate,
                              len(self.caller_audio) / SAMPLE_RATE, ending == "timed out")


async def converse_with_file(engines, config, caller_audio: np.ndarray, listeners=(), *,
                             max_tail_s: float = 60.0, behaviour: Behaviour = DEFAULT_BEHAVIOUR
                             ) -> tuple[FileCallResult, list]:
    """Play `caller_audio` to a fresh conversation on shared engines; return the timeline and finished turns."""
    from sub300.agent.playout import PlayoutQueue

    playout = PlayoutQueue(engines.tts.sample_rate, time.monotonic)
    conversation = Conversation(engines, config, playout, listeners=list(listeners), behaviour=behaviour)
    try:
        result = await FileCall(conversation, caller_audio, max_tail_s=max_tail_s).run()
    finally:
        await conversation.aclose()
    return result, conversation.finished
