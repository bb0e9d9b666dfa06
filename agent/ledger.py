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

To the caller's ear: voice-to-voice ends when the first agent frame is
handed to the transport.  The transport adds its own parts on both sides
(`transport_ms`, named in `INBOUND_PARTS` and `OUTBOUND_PARTS`): the caller's
voice on its way in (before our ``speech_end``: the network, our jitter
buffer, the decoder) and the agent's on its way out (after
``first_audio_out``: the network, the peer's jitter buffer, its playout).
``mouth_to_ear_estimate_ms`` = inbound parts + voice_to_voice + outbound
parts, all measured or reported to the server; the mark
``first_audio_heard`` = ``first_audio_out`` + the outbound parts.  A peer
that measures its own mouth-to-ear (the demo page, the aiortc test caller)
reports it: ``mouth_to_ear_reported_ms``, kept beside the estimate, never
mixed into it.

Usage: ``usage`` holds what the call consumed that this turn's report
carries (quantities of agent/usage.py: seconds, tokens, characters), filled
by the conversation just before the turn's `TurnFinished`, `TurnFailed` or
`TurnDiscarded` (agent/metering.py says what goes into which report).
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
    "tool_start",        # the first tool call of the turn started (the model asked for it)
    "tool_end",          # the turn's last tool call ended (the latest write wins: `mark_last`)
    "llm_first_token",   # first text from the language model
    "first_piece",       # first piece of the reply (sentence or clause) complete and handed to TTS
    "tts_start",         # TTS started on the first piece
    "tts_first_audio",   # TTS produced its first audio chunk
    "first_audio_out",   # the transport played/sent the first agent audio frame
    "first_audio_heard", # estimated: first_audio_out + the outbound transport parts (the caller hears it)
    "llm_done",          # the language model finished
    "last_audio_out",    # the last agent audio frame went out
)

#: Critical-path stages: (stage name, mark that ends it).  Each starts where the previous ended.
STAGES = (
    ("endpointing", "endpoint"),
    ("stt", "stt_final"),
    ("llm_tool_call", "tool_start"),   # the model's answer up to its tool call (tools turns only)
    ("tool", "tool_end"),              # the tools, and the model's rounds between them (tools turns only)
    ("llm_first_token", "llm_first_token"),
    ("first_piece", "first_piece"),
    ("tts_first_audio", "tts_first_audio"),
    ("send", "first_audio_out"),
)

#: the transport's parts of mouth-to-ear before ``speech_end`` (ms): the caller's voice on its way in
INBOUND_PARTS = (
    "network_in",         # one-way network, the caller to us: half the round-trip time
    "jitter_buffer_in",   # our jitter buffer: packet arrival → frame released to the decoder
    "decode_in",          # released → decoded and handed to the VAD (decoder thread, resampler)
)
#: the transport's parts of mouth-to-ear after ``first_audio_out`` (ms): the agent's voice on its way out
OUTBOUND_PARTS = (
    "quiet_lead",         # first_audio_out → the reply's first audible frame (TTS voices start softly)
    "send_out",           # frame pulled → packet on the wire (encoder); the pacing is already in first_audio_out
    "network_out",        # one-way network, us to the caller: half the round-trip time
    "jitter_buffer_out",  # the peer's jitter buffer (its own report: getStats() jitterBufferDelay per frame)
    "playout",            # the peer's decoded audio → where it measures (its audio graph), when it reports one
)
TRANSPORT_PARTS = INBOUND_PARTS + OUTBOUND_PARTS

#: stages a turn has only when the model called a tool: skipped (not the end of the walk) when their
#: mark is missing, and cut at ``first_piece`` when something was said first (the filler: the wait for
#: the tool then ends where the filler was queued, and voice-to-voice measures the filler)
TOOL_STAGES = ("llm_tool_call", "tool")
#: stages cut at ``first_piece`` when it came before their mark (only a filler comes before the LLM's
#: first token; in any other turn these marks precede ``first_piece``)
_CUT_AT_FIRST_PIECE = (*TOOL_STAGES, "llm_first_token")

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
    #: per engine stage, a remote engine's time on the network (ms; its `WorkTicket.network_s`): apart
    #: from queue_ms and work_ms, which then hold the endpoint's own queue and work
    network_ms: dict[str, float] = field(default_factory=dict)
    #: the transport's parts of mouth-to-ear (ms), named in `INBOUND_PARTS` / `OUTBOUND_PARTS`
    transport_ms: dict[str, float] = field(default_factory=dict)
    #: the caller's own measurement of mouth-to-ear (ms), as its peer reported it; None when none came
    mouth_to_ear_reported_ms: float | None = None
    #: usage this turn's report carries: quantity (agent/usage.py) → amount; {} until reported
    usage: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float) -> None:
        """Record a mark (clock seconds); the first write wins so retries cannot move it."""
        name = _current(name)
        if name not in MARKS:
            raise KeyError(f"unknown ledger mark {name!r}")
        self.marks.setdefault(name, at)

    def mark_last(self, name: str, at: float) -> None:
        """Record a mark that the latest write sets (``tool_end``: the turn's last tool call)."""
        name = _current(name)
        if name not in MARKS:
            raise KeyError(f"unknown ledger mark {name!r}")
        self.marks[name] = max(at, self.marks.get(name, at))

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
        # a remote engine: its endpoint's queue wait counts as queue, the wire time as network, not work
        remote_queue, network = ticket.remote_queue_s or 0.0, ticket.network_s
        if wait is not None:
            self.queue_ms.setdefault(stage, round((wait + remote_queue) * 1000.0, 1))
        if work is not None:
            work = max(0.0, work - remote_queue - (network or 0.0))
            self.work_ms.setdefault(stage, round(work * 1000.0, 1))
        if network is not None:
            self.network_ms.setdefault(stage, round(network * 1000.0, 1))

    def record_transport(self, part: str, ms: float) -> None:
        """Keep one transport part (ms, finite, >= 0; first write wins).  Raises KeyError / ValueError."""
        if part not in TRANSPORT_PARTS:
            raise KeyError(f"unknown transport part {part!r} (one of {TRANSPORT_PARTS})")
        if not (0.0 <= ms < 60_000.0):
            raise ValueError(f"transport part {part} must be 0..60000 ms, not {ms!r}")
        self.transport_ms.setdefault(part, round(float(ms), 1))

    def record_heard(self) -> None:
        """Mark ``first_audio_heard`` = ``first_audio_out`` + the outbound parts known so far (needs both)."""
        outbound = [self.transport_ms[p] for p in OUTBOUND_PARTS if p in self.transport_ms]
        if outbound and "first_audio_out" in self.marks:
            self.mark("first_audio_heard", self.marks["first_audio_out"] + sum(outbound) / 1000.0)

    @property
    def inbound_ms(self) -> float:
        return sum(self.transport_ms.get(p, 0.0) for p in INBOUND_PARTS)

    @property
    def outbound_ms(self) -> float:
        return sum(self.transport_ms.get(p, 0.0) for p in OUTBOUND_PARTS)

    @property
    def mouth_to_ear_estimate_ms(self) -> float | None:
        """Inbound parts + voice_to_voice + outbound parts; None without voice_to_voice or the peer's
        side of the outbound path (``jitter_buffer_out``, which only the peer's report gives)."""
        v2v = self.voice_to_voice_ms
        if v2v is None or "jitter_buffer_out" not in self.transport_ms:
            return None
        return self.inbound_ms + v2v + self.outbound_ms

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
        return {stage: (end - start) * 1000.0 for stage, start, end in self.stage_spans()}

    def stage_spans(self) -> list[tuple[str, float, float]]:
        """(stage, start, end) in clock seconds along the critical path from ``speech_end``, back to back
        (the walk `stages_ms` and the tracing spans share).  The walk stops at the first missing mark,
        except the `TOOL_STAGES`, skipped in a turn without tools.  When the filler was the first piece,
        the tool stages and the LLM's first token end at ``first_piece``: voice-to-voice is the filler's."""
        marks = self.marks
        if "speech_end" not in marks:
            return []
        spans: list[tuple[str, float, float]] = []
        cursor = marks["speech_end"]
        for stage, end_mark in STAGES:
            if end_mark not in marks:
                if stage in TOOL_STAGES:
                    continue
                break
            at = marks[end_mark]
            if stage in _CUT_AT_FIRST_PIECE and "first_piece" in marks:
                at = min(at, marks["first_piece"])
            end = max(cursor, at)
            spans.append((stage, cursor, end))
            cursor = end
        return spans

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
            "network_ms": dict(self.network_ms),
            "transport_ms": dict(self.transport_ms),
            "mouth_to_ear_estimate_ms": _rounded(self.mouth_to_ear_estimate_ms),
            "mouth_to_ear_reported_ms": _rounded(self.mouth_to_ear_reported_ms),
            "usage": dict(self.usage),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TurnLedger:
        """A ledger from `to_dict()` output, marks relative to speech_end (which becomes 0.0).

        Accepts documents written before a rename (e.g. ``first_sentence``).
        """
        marks = {_current(name): ms / 1000.0 for name, ms in doc.get("marks_ms", {}).items()}
        return cls(doc["turn"], {m: marks[m] for m in MARKS if m in marks}, dict(doc.get("notes", {})),
                   dict(doc.get("queue_ms", {})), dict(doc.get("work_ms", {})), dict(doc.get("network_ms", {})),
                   dict(doc.get("transport_ms", {})), doc.get("mouth_to_ear_reported_ms"),
                   {name: float(amount) for name, amount in doc.get("usage", {}).items()})

    def format_table(self, budget_ms: float | None = None) -> str:
        """A short human report: one line per critical-path stage."""
        lines = [f"turn {self.turn} ledger (ms after the caller's true end of speech):"]
        for stage, ms in self.stages_ms().items():
            lines.append(f"  {stage:<16} {ms:8.1f}")
        for stage in ENGINE_STAGES:
            if stage in self.queue_ms:
                work = self.work_ms.get(stage)
                worked = f", worked {work:.1f}" if work is not None else ""
                if stage in self.network_ms:
                    worked += f", network {self.network_ms[stage]:.1f}"
                lines.append(f"  ({stage} engine: queued {self.queue_ms[stage]:.1f}{worked})")
        for name, ms in self.overlaps_ms().items():
            lines.append(f"  ({name:<14} {ms:8.1f}  overlapped, not on the critical path)")
        if "tool_calls" in self.notes:
            filler = self.notes.get("filler")
            lines.append(f"  (tools: {self.notes['tool_calls']} call(s) in {self.notes.get('tool_rounds', 1)} round(s), "
                         f"{self.notes.get('tool_ms', 0.0):.1f} ms"
                         + (f"; the first audio was the filler {filler!r}" if filler else "") + ")")
        v2v = self.voice_to_voice_ms
        if v2v is not None:
            verdict = ""
            if budget_ms is not None:
                verdict = "  within budget" if v2v <= budget_ms else f"  over the {budget_ms:.0f} ms budget"
            lines.append(f"  {'voice_to_voice':<16} {v2v:8.1f}{verdict}")
        if self.transport_ms:
            parts = ", ".join(f"{p} {self.transport_ms[p]:.1f}" for p in TRANSPORT_PARTS if p in self.transport_ms)
            lines.append(f"  (transport: {parts})")
        estimate, reported = self.mouth_to_ear_estimate_ms, self.mouth_to_ear_reported_ms
        if estimate is not None or reported is not None:
            shown = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(f"  {'mouth_to_ear':<16} {shown(estimate):>8} estimated by the server, "
                         f"{shown(reported)} measured by the caller")
        return "\n".join(lines)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
