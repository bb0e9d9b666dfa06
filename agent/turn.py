"""One caller turn, spoken or keyed, and the work it owns.

Like LiveKit Agents' SpeechHandle, but for the caller's side: everything done
for one turn — its transcriptions, a barge-in word check, a speculative
reply, the reply — runs in the turn's own `TaskOwner`, so the turn's work is
cancelled as one (`tasks.cancel()`) once it has been answered, and the
conversation's owner still holds it all if the call ends first.
"""
from __future__ import annotations

from dataclasses import dataclass

from .barge_in import BargeIn
from .ledger import TurnLedger
from .reply import Reply
from .tasks import TaskOwner
from .transcription import Transcription, UtteranceTranscriber


@dataclass(eq=False)
class Turn:
    number: int                                    # from 1, per call
    ledger: TurnLedger
    tasks: TaskOwner
    start_sample: int = 0                          # first sample transcribed (speech start minus pre-roll)
    voiced_start: int = 0                          # first voiced sample
    transcriber: UtteranceTranscriber | None = None   # None for a keypad entry
    transcription: Transcription | None = None     # the final, once the turn ended
    speculation: Reply | None = None               # a reply started on the early final, its audio held
    barge_in: BargeIn | None = None                # set when this turn must earn the interruption

    @property
    def stt(self) -> UtteranceTranscriber:
        """The transcriber of a spoken turn (only keypad turns have none)."""
        assert self.transcriber is not None, f"turn {self.number} is not a spoken turn"
        return self.transcriber

    def drop_speculation(self, wasted: bool = True) -> None:
        """Cancel the speculative reply, if any; ``wasted`` counts it in the ledger's notes."""
        if self.speculation is not None:
            self.speculation.cancel()
            self.speculation = None
            if wasted:
                self.ledger.notes["speculation_wasted"] = self.ledger.notes.get("speculation_wasted", 0) + 1
