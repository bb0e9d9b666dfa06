"""The latency ledger: named marks of one turn on one monotonic clock.

It is the single source for logs, the CLI report, the demo page, the metrics
and the benchmarks.  Stage durations are derived from the marks along the
critical path from the caller's true end of speech to the agent's first
sound, so they add up to voice-to-voice exactly; work that ran in the
shadow of another stage (for instance a transcription started during the
endpointing silence) is reported as overlap instead of being counted twice.

Names: the mark and stage `first_piece` (the first sentence *or clause* of
the reply handed to TTS) was called `first_sentence` before; the old name is
still accepted wherever a name is read — `mark()`, `has()`, `between_ms()`
and `TurnLedger.from_dict()` (ledgers saved by older versions) — and
written as `first_piece`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sub300.models.scheduling import WorkTicket

#: Marks in the order they normally happen.
MARKS = (
    "speech_start",      # first voiced frame of the caller's turn
    "speech_end",        # end of the last voiced frame: the true end of speech (clock starts here)
    "stt_start",         # the final transcription started (may precede endpoint: early final)
    "endpoint",          # the silence hangover expired: the turn is over
    "stt_final",         # final transcript ready
    "llm_start",         # request sent to the language model
    "llm_first_token",   # first text from the language model
    "first_piece",       # first piece of the reply (sentence or clause) complete and handed to TTS
    "tts_start",         # TTS started on the first piece
    "tts_first_audio",   # TTS produced its first audio chunk
    "first_audio_out",   # the transport played/sent the first agent audio frame
    "llm_done",          # the language model finished
    "last_audio_out",    # the last agent audio frame went out
)

#: Critical-path stages: (stage name, mark that ends it).  Each starts where the previous ended.
STAGES = (
    ("endpointing", "endpoint"),
    ("stt", "stt_final"),
    ("llm_first_token", "llm_first_token"),
    ("first_piece", "first_piece"),
    ("tts_first_audio", "tts_first_audio"),
    ("send", "first_audio_out"),
)

#: engines whose queue wait a turn records (`record_engine`)
ENGINE_STAGES = ("stt", "llm", "tts")

#: old name → current name, for marks and stages
ALIASES = {"first_sentence": "first_piece"}


def _current(name: str) -> str:
    return ALIASES.get(name, name)


@dataclass
class TurnLedger:
    turn: int
    marks: dict[str, float] = field(default_factory=dict)
    #: free-form facts about the turn: engines, speculation, word counts
    notes: dict[str, Any] = field(default_factory=dict)
    #: per engine stage ("stt", "llm", "tts"): ms the critical-path request waited for the engine
    #: (submitted → its work started) and ms of its work, from its `WorkTicket` (models/scheduling.py)
    queue_ms: dict[str, float] = field(default_factory=dict)
    work_ms: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float) -> None:
        """Record a mark (clock seconds); the first write wins so retries cannot move it."""
        name = _current(name)
        if name not in MARKS:
            raise KeyError(f"unknown ledger mark {name!r}")
        self.marks.setdefault(name, at)

    def record_engine(self, stage: str, ticket: WorkTicket, work_end: float | None = None) -> None:
        """Keep the queue wait and the work of ``stage``'s critical-path request (first write wins).

        The work runs from the ticket's start to ``work_end`` (clock seconds)
        or, without one, to the ticket's end: the LLM's is given up to its
        first token, TTS's up to the first piece's audio, STT's is the final
        transcription.
        """
        if stage not in ENGINE_STAGES:
            raise KeyError(f"unknown engine stage {stage!r} (one of {ENGINE_STAGES})")
        wait, work = ticket.queue_wait_s, ticket.work_s
        if work_end is not None and ticket.started is not None:
            work = max(0.0, work_end - ticket.started)
        if wait is not None:
            self.queue_ms.setdefault(stage, round(wait * 1000.0, 1))
        if work is not None:
            self.work_ms.setdefault(stage, round(work * 1000.0, 1))

    def has(self, name: str) -> bool:
        return _current(name) in self.marks

    def between_ms(self, start: str, end: str) -> float | None:
        start, end = _current(start), _current(end)
        if start in self.marks and end in self.marks:
            return (self.marks[end] - self.marks[start]) * 1000.0
        return None

    @property
    def voice_to_voice_ms(self) -> float | None:
        return self.between_ms("speech_end", "first_audio_out")

    def stages_ms(self) -> dict[str, float]:
        """Critical-path durations from speech_end; they sum to voice_to_voice_ms.

        A stage whose end mark came before the previous stage ended (it ran
        in the shadow of an earlier one) counts 0 here; see overlaps_ms().
        """
        if "speech_end" not in self.marks:
            return {}
        out: dict[str, float] = {}
        cursor = self.marks["speech_end"]
        for stage, end_mark in STAGES:
            if end_mark not in self.marks:
                break
            end = max(cursor, self.marks[end_mark])
            out[stage] = (end - cursor) * 1000.0
            cursor = end
        return out

    def overlaps_ms(self) -> dict[str, float]:
        """Engine time that was hidden behind another stage (not in stages_ms)."""
        out: dict[str, float] = {}
        for name, start in (("stt_before_endpoint", "stt_start"), ("llm_before_endpoint", "llm_start"),
                            ("tts_before_endpoint", "tts_start")):
            if {start, "endpoint"} <= self.marks.keys():
                hidden = self.marks["endpoint"] - self.marks[start]
                if hidden > 0:
                    out[name] = hidden * 1000.0
        return out

    def relative_marks_ms(self) -> dict[str, float]:
        """Marks in ms relative to speech_end (negative = before it), in MARKS order."""
        origin = self.marks.get("speech_end")
        if origin is None:
            return {}
        return {m: round((self.marks[m] - origin) * 1000.0, 1) for m in MARKS if m in self.marks}

    def to_dict(self) -> dict[str, Any]:
        v2v = self.voice_to_voice_ms
        return {
            "turn": self.turn,
            "marks_ms": self.relative_marks_ms(),
            "stages_ms": {k: round(v, 1) for k, v in self.stages_ms().items()},
            "overlaps_ms": {k: round(v, 1) for k, v in self.overlaps_ms().items()},
            "voice_to_voice_ms": None if v2v is None else round(v2v, 1),
            "queue_ms": dict(self.queue_ms),
            "work_ms": dict(self.work_ms),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TurnLedger:
        """A ledger from `to_dict()` output, marks relative to speech_end (which becomes 0.0).

        Accepts documents written before a rename (e.g. ``first_sentence``).
        """
        marks = {_current(name): ms / 1000.0 for name, ms in doc.get("marks_ms", {}).items()}
        return cls(doc["turn"], {m: marks[m] for m in MARKS if m in marks}, dict(doc.get("notes", {})),
                   dict(doc.get("queue_ms", {})), dict(doc.get("work_ms", {})))

    def format_table(self, budget_ms: float | None = None) -> str:
        """A short human report: one line per critical-path stage."""
        lines = [f"turn {self.turn} ledger (ms after the caller's true end of speech):"]
        for stage, ms in self.stages_ms().items():
            lines.append(f"  {stage:<16} {ms:8.1f}")
        for stage in ENGINE_STAGES:
            if stage in self.queue_ms:
                work = self.work_ms.get(stage)
                worked = f", worked {work:.1f}" if work is not None else ""
                lines.append(f"  ({stage} engine: queued {self.queue_ms[stage]:.1f}{worked})")
        for name, ms in self.overlaps_ms().items():
            lines.append(f"  ({name:<14} {ms:8.1f}  overlapped, not on the critical path)")
        v2v = self.voice_to_voice_ms
        if v2v is not None:
            verdict = ""
            if budget_ms is not None:
                verdict = "  within budget" if v2v <= budget_ms else f"  over the {budget_ms:.0f} ms budget"
            lines.append(f"  {'voice_to_voice':<16} {v2v:8.1f}{verdict}")
        return "\n".join(lines)
