"""Cut a streaming LLM reply into pieces TTS can speak while the rest is generated.

A piece ends at a sentence end or at a line break.  Sentence ends are decided by
pysbd (Sadvilkar & Neumann, "PySBD: Pragmatic Sentence Boundary
Disambiguation", NLP-OSS 2020: the Golden Rules set), so "U.S.", "a.m.",
"Dr.", "e.g.", "etc.", "No. 5", "vs.", "3.14", "$3.50", URLs, e-mail
addresses and ellipses do not end a sentence unless the next words say so.

Streaming: pysbd needs lookahead ("in the U.S. It" ends after "U.S.", "the
U.S. economy" does not), so a sentence is released when the *next* sentence
has started (its first characters arrived) or the stream ends -- for a token
stream that is one token later than "at the full stop", which is what the
previous rule (wait for the whitespace after the stop) cost in practice, since
tokens carry their leading space.  After a word that may be an abbreviation
("U.S.", "p.m.", "Dr.", a single letter) pysbd judges by the whole next word,
so there the release waits for that word to end: one more token.  pysbd runs only when the unfinished text
holds a candidate stop followed by more text, on that text only (a sentence or
two, well under a millisecond; measured in the report of issue 9).

The *first* piece may also end at a clause break (, ; : -- followed by
whitespace) once it is at least `min_clause_chars` long, or after
`first_piece_max_words` words when no punctuation has come by then: that is
what the caller waits for, while later pieces are synthesized during playback,
where whole sentences sound better and the LLM is far ahead of speech anyway.
A cut at 3 words (`tts.first_piece_max_words`, the default) is what
scripts/bench_first_piece.py chose
(issue 11, 12 questions, this 2-core CPU):
first audio p50 315 ms against 525 ms at 6 words, the answer heard back by
Whisper as well (WER 8.2 % against 7.9 %, within the run's noise; 5.9 % for
the answer synthesized whole), and a pause at the seam of 85 ms p50 / 665 ms
p95 as the caller hears it (6 words: 80 / 485 ms) once agent/reply.py trims
the silence Piper ends the cut piece with.

Pieces come out as the model wrote them, less markdown formatting and with
single spaces (`clean_for_speech`): that is what the history records.  Turning
them into words for TTS is `spoken_form.spoken_form`'s job.  A piece with
nothing to say (only emoji or markup) is dropped.
"""
from __future__ import annotations

import re

import pysbd
from pysbd.lang.english import English

from .spoken_form import UNIT_NAMES, spoken_form, strip_markdown

_SEGMENTER = pysbd.Segmenter(language="en", clean=False, char_span=True)
# a stop (with closing quotes/brackets/markdown) followed by the start of more text
_CANDIDATE_STOP = re.compile(r"[.!?…][\"'”’)\]*_`]*\s+\S")
_ABBREVIATIONS = frozenset(English.Abbreviation.ABBREVIATIONS)
# the last word of a sentence that may be an abbreviation: "U.S.", "p.m.", "Dr.", "etc.", "A."
_ABBREVIATION_LIKE = re.compile(r"(?:^|\s)(?:\w(?:\.\w)+|\w|(?P<word>\w+))\.[\"'”’)\]*_`]*\s*$")
_WORD_DONE = re.compile(r"\s*\S+?(?:\s|[,;:.!?])")
_CLAUSE_END = re.compile(r"[,;:—]+(?=\s)")
_BELONGS_TO_NUMBER = re.compile(
    r"(?:thousand|million|billion|trillion|percent|[ap]\.?m\.?|[AP]\.?M\.?|(?:" + UNIT_NAMES + r"))(?![\w/])")
_LINE_BREAK = re.compile(r"\n\s*(?=\S)")
# a list bullet, number or heading mark at the start of a line: not a sentence of its own
_LINE_MARK = re.compile(r"[ \t]*(?:[-*+•]|\d{1,3}[.)]|#{1,6})[ \t]+")


def clean_for_speech(text: str) -> str:
    """``text`` less markdown formatting (`spoken_form.strip_markdown`), on one line with single spaces."""
    return re.sub(r"\s+", " ", strip_markdown(text)).strip()


def sentence_end(text: str) -> int | None:
    """The end (offset, after trailing spaces) of the first sentence in ``text`` if
    the text shows that it is complete -- another sentence has begun -- else None."""
    if not _CANDIDATE_STOP.search(text):
        return None
    spans = _SEGMENTER.segment(text)
    for span in spans[:-1]:
        end = int(span.end)
        if not text[end - 1].isspace():
            # not between words: a run of stops still coming ("Wait." + ".."), or pysbd
            # cutting inside a token (it splits "example.com/a?b=c" at the "?")
            continue
        # After a possible abbreviation pysbd decides on the whole next word ("U.S. It" vs
        # "U.S. Itasca"): wait until that word is complete.
        abbreviation = _ABBREVIATION_LIKE.search(text, 0, end)
        if (abbreviation and (abbreviation["word"] is None or abbreviation["word"].lower() in _ABBREVIATIONS)
                and not _WORD_DONE.match(text, end)):
            return None
        return end
    return None


class SentenceSplitter:
    """Streaming splitter: `push` text as it comes, `flush` at the end; both return
    finished pieces (str, cleaned by `clean_for_speech`)."""

    def __init__(self, min_clause_chars: int = 12, first_piece_max_words: int = 0):
        self.min_clause_chars = min_clause_chars
        self.first_piece_max_words = first_piece_max_words
        self._buffer = ""
        self._pieces_out = 0
        self._line_start = True  # the buffer begins a line (stream start, or after a line break)

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the pieces that are now complete."""
        self._buffer += text
        pieces: list[str] = []
        while True:
            found = self._find_cut()
            if found is None:
                return pieces
            cut, at_line_break = found
            piece = clean_for_speech(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            self._line_start = at_line_break
            if piece and spoken_form(piece):
                pieces.append(piece)
                self._pieces_out += 1

    def flush(self) -> list[str]:
        """The rest, at the end of the stream."""
        piece = clean_for_speech(self._buffer)
        self._buffer = ""
        self._line_start = True
        return [piece] if piece and spoken_form(piece) else []

    def _find_cut(self) -> tuple[int, bool] | None:
        """The earliest place where the buffer may be cut, if any, and whether it is a line break."""
        buffer = self._buffer
        line_break = _LINE_BREAK.search(buffer)
        line_end = line_break.start() if line_break else len(buffer)
        skip = 0
        if self._line_start and (mark := _LINE_MARK.match(buffer, 0, line_end)):
            skip = mark.end()
        end = sentence_end(buffer[skip:line_end])
        cut: tuple[int, bool] | None = None
        if end is not None:
            cut = (skip + end, False)
        elif line_break is not None:
            cut = (line_break.end(), True)
        if self._pieces_out:
            return cut
        for match in _CLAUSE_END.finditer(buffer, skip, line_end):
            if cut is not None and match.end() >= cut[0]:
                break
            if (len(clean_for_speech(buffer[: match.end()])) >= self.min_clause_chars
                    and buffer.count("`", 0, match.end()) % 2 == 0):
                return match.end(), False
        if cut is None and self.first_piece_max_words:
            # No punctuation in sight: start speaking after a phrase's worth of words.
            # A word counts once the next one has begun (the space after it is seen).
            # Not inside inline code, next to an operator ("a *" | "b"), or before a word
            # that belongs to the number ("$2.5" | "million", "9" | "a.m.").
            words = list(re.finditer(r"\S+(?=\s+(\S+))", buffer[:line_end]))
            for word in words[self.first_piece_max_words - 1:]:
                after = word.group(1)
                if (buffer.count("`", 0, word.end()) % 2 == 0 and re.search(r"\w", word.group())
                        and re.match(r"[\w(\[\"'“‘]", after) and not _BELONGS_TO_NUMBER.match(after)):
                    return word.end(), False
        return cut
