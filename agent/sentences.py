"""Cut a streaming LLM reply into pieces TTS can speak while the rest is generated.

A piece ends at a sentence end (. ! ? followed by whitespace).  The *first*
piece may also end at a clause break (, ; : — followed by whitespace) once it
is at least `min_clause_chars` long, or after `first_piece_max_words` words
when no punctuation has come by then: that is what the caller waits for, while
later pieces are synthesized during playback, where whole sentences sound
better and the LLM is far ahead of speech anyway.  A break is only taken once the next character is seen, so
"3.5" and "e.g." mid-word do not split.  Markdown decorations that small
models like to emit are removed, since TTS would read them aloud.
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)")
_CLAUSE_END = re.compile(r"[,;:—]+(?=\s)")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "etc.", "e.g.", "i.e.", "no.", "jr.", "sr."}
_MARKDOWN = re.compile(r"[*_#`]+|^\s*[-•]\s+", re.MULTILINE)


def clean_for_speech(text: str) -> str:
    return re.sub(r"\s+", " ", _MARKDOWN.sub("", text)).strip()


class SentenceSplitter:
    def __init__(self, min_clause_chars: int = 12, first_piece_max_words: int = 0):
        self.min_clause_chars = min_clause_chars
        self.first_piece_max_words = first_piece_max_words
        self._buffer = ""
        self._pieces_out = 0

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the pieces that are now complete."""
        self._buffer += text
        pieces: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return pieces
            piece = clean_for_speech(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            if piece:
                pieces.append(piece)
                self._pieces_out += 1

    def flush(self) -> list[str]:
        """The rest, at the end of the stream."""
        piece = clean_for_speech(self._buffer)
        self._buffer = ""
        return [piece] if piece else []

    def _find_cut(self) -> int | None:
        """The earliest place where the buffer may be cut, if any."""
        sentence = None
        for match in _SENTENCE_END.finditer(self._buffer):
            head = self._buffer[: match.end()]
            if head.split()[-1].lower() in _ABBREVIATIONS or not clean_for_speech(head):
                continue
            sentence = match.end()
            break
        if self._pieces_out:
            return sentence
        for match in _CLAUSE_END.finditer(self._buffer):
            if sentence is not None and match.end() >= sentence:
                break
            if len(clean_for_speech(self._buffer[: match.end()])) >= self.min_clause_chars:
                return match.end()
        if sentence is None and self.first_piece_max_words:
            # No punctuation in sight: start speaking after a phrase's worth of words.
            # A word counts once the next one has begun (the space after it is seen).
            words = list(re.finditer(r"\S+(?=\s+\S)", self._buffer))
            if len(words) >= self.first_piece_max_words:
                return words[self.first_piece_max_words - 1].end()
        return sentence
