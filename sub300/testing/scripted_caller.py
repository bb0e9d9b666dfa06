"""A scripted caller for tests and benchmarks: speaks, listens, reacts, in real time.

Like the file transport, it delivers 20 ms of caller audio and pulls 20 ms of
agent audio per tick on the wall clock; unlike a file, what it says next can
wait for what the agent does (e.g. interrupt once the agent is audible), so
the tests do not depend on how fast this machine answers.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sub300.agent.audio import AudioFrame
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.conversation import Conversation
from sub300.agent.events import Event
from sub300.agent.playout import PlayoutQueue
from sub300.media.pacing import Pacer

if TYPE_CHECKING:
    from sub300.agent.config import Config
    from sub300.agent.engines import Engines

FRAME = 320


@dataclass
class ScriptedCaller:
    """A caller on a fresh Conversation over ``engines``: ``say`` speaks 16 kHz int16, ``silence`` and
    ``wait_until`` keep the line open; every method advances the wall clock in 20 ms ticks."""

    engines: Engines
    config: Config
    #: what the caller's microphone picks up of the agent (echo), given the agent frame; None = nothing
    echo: Callable[[np.ndarray], np.ndarray | None] | None = None
    events: list[Event] = field(default_factory=list)
    agent_audio: list[tuple[float, np.ndarray]] = field(default_factory=list)
    #: the clock of the call (the conversation's, the playout's, the pacing's): the event loop's for virtual time
    clock: Callable[[], float] = time.monotonic
    #: the agent's instructions, tools and hooks (agent/behaviour.py)
    behaviour: Behaviour = DEFAULT_BEHAVIOUR

    def __post_init__(self) -> None:
        self.playout = PlayoutQueue(16000, self.clock)
        self.conversation = Conversation(self.engines, self.config, self.playout, clock=self.clock,
                                         listeners=[self.events.append], behaviour=self.behaviour)
        self._pacer = Pacer(0.02, self.clock)   # pulled one tick per frame the script says
        self._echo_queue: list[np.ndarray] = []

    async def _tick(self, caller: np.ndarray) -> None:
        """One 20 ms slot: pull the agent's frame, then deliver ``caller`` (320 samples, 16 kHz) stamped with the deadline."""
        deadline = await self._pacer.next_tick()
        pulled = self.playout.pull(FRAME)
        if pulled is not None:
            self.agent_audio.append((deadline, pulled))
        if self.echo is not None:
            echoed = self.echo(pulled if pulled is not None else np.zeros(FRAME, np.int16))
            self._echo_queue.append(echoed if echoed is not None else np.zeros(FRAME, np.int16))
            if len(self._echo_queue) > 3:  # 60 ms round trip
                caller = np.clip(caller.astype(np.int32) + self._echo_queue.pop(0), -32768, 32767).astype(np.int16)
        self.conversation.push_frame(AudioFrame(caller, deadline))
        await asyncio.sleep(0)   # the conversation reacts to this frame before the script looks again

    async def say(self, pcm: np.ndarray) -> None:
        """Speak ``pcm`` (16 kHz mono int16), 20 ms per tick; the last frame is padded with silence."""
        for i in range(0, len(pcm), FRAME):
            chunk = pcm[i:i + FRAME]
            if len(chunk) < FRAME:
                chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), np.int16)])
            await self._tick(chunk)

    async def silence(self, seconds: float) -> None:
        """Stay silent on the line for ``seconds``."""
        await self.say(np.zeros(int(seconds * 16000), np.int16))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        """Stay silent on the line until `predicate()` holds; `TimeoutError` after ``timeout`` seconds."""
        end = self.clock() + timeout
        while not predicate():
            if self.clock() > end:
                raise TimeoutError("the agent did not get there in time")
            await self._tick(np.zeros(FRAME, np.int16))

    async def until_idle(self, timeout: float = 60.0) -> None:
        """Stay silent until the agent has nothing in flight or queued."""
        await self.wait_until(lambda: not self.conversation.busy, timeout)

    async def close(self) -> None:
        """Close the conversation (cancels its work; nothing is left running)."""
        await self.conversation.aclose()
