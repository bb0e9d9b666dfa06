"""The shared TTS service: syntheses from all calls through a small priority pool.

Piper (ONNX Runtime) already uses every core for one synthesis, so on a CPU
running two at once only makes both late.  `ScheduledSynthesizer` lets at
most ``workers`` syntheses run and serves the waiting ones by deadline class
(models/scheduling.py): a reply's first piece (COMMITTED: the caller is
waiting in silence) before the later pieces of replies whose earlier audio
is still playing (SLACK), and before speculative replies.  A batch of texts
would need a TTS model that synthesizes several utterances in one run, which
Piper's VITS voices do not offer through piper-tts; a bounded pool is what
measures better here (README, issue 10).

It implements `SpeechSynthesizer` (``synthesize`` passes through, for
warm-up and scripts) and the coroutine the reply prefers,
``synthesize_async(text, ticket=)``.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterator

import numpy as np

from .protocols import SpeechSynthesizer
from .scheduling import PriorityLimiter, Urgency, WorkTicket
from .threads import iterate_in_thread

log = logging.getLogger(__name__)


class ScheduledSynthesizer:
    """``synthesizer`` shared by all calls, at most ``workers`` syntheses at once."""

    def __init__(self, synthesizer: SpeechSynthesizer, *, workers: int = 1) -> None:
        self.engine = synthesizer
        self.name = synthesizer.name
        self.sample_rate = synthesizer.sample_rate
        self.pool = PriorityLimiter(workers, name=f"tts {synthesizer.name}")
        log.info("tts: %s, %d synthesis at a time, first pieces first", self.name, workers)

    @property
    def waiting(self) -> int:
        return self.pool.waiting

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Blocking, unscheduled (warm-up, scripts)."""
        return self.engine.synthesize(text)

    async def synthesize_async(self, text: str, *, ticket: WorkTicket | None = None) -> AsyncGenerator[np.ndarray, None]:
        """Audio chunks of ``text`` (int16 at ``sample_rate``), once a slot is free for ``ticket``'s class."""
        ticket = ticket or WorkTicket(Urgency.COMMITTED, label="tts")
        async with self.pool.slot(ticket):
            chunks = iterate_in_thread(lambda: self.engine.synthesize(text), name="tts")
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

    def __repr__(self) -> str:
        return f"ScheduledSynthesizer({self.engine!r}, workers={self.pool.slots})"
