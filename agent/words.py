"""What a transcript says, as far as turn-taking cares: any words, a backchannel, a phrase.

Plain text tests, no engines: the barge-in policy asks whether a short
utterance was a real interruption or a listener's "mm-hmm"; the conversation
asks whether a turn held words at all and whether the caller said goodbye.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_WORDS = re.compile(r"[A-Za-z0-9]")

#: what callers say to show they are listening; it must not stop the agent
#: (the "backchannel" of conversation analysis; LiveKit and pipecat filter the same kind of list)
BACKCHANNELS = {"mm", "mmm", "hmm", "mhm", "mm-hmm", "mm hmm", "uh-huh", "uh huh", "yeah", "yes", "yep",
                "okay", "ok", "right", "sure", "i see", "uh", "um", "ah", "oh", "you"}  # "you": Whisper's noise word


def has_words(text: str) -> bool:
    """At least one letter or digit (Whisper returns "" or punctuation for noise)."""
    return bool(_WORDS.search(text))


def is_backchannel(text: str) -> bool:
    """The whole transcript is one of BACKCHANNELS (case and punctuation ignored)."""
    return " ".join(re.findall(r"[a-z'-]+", text.lower())) in BACKCHANNELS


def said_phrase(text: str, phrases: Iterable[str]) -> str | None:
    """The first of ``phrases`` said as whole words in ``text`` (case and punctuation ignored), or None."""
    said = " ".join(re.findall(r"[a-z']+", text.lower()))
    for phrase in phrases:
        if re.search(rf"\b{re.escape(phrase.lower())}\b", said):
            return phrase
    return None
