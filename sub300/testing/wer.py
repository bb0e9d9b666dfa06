"""Word error rate for the speech-recognition tests and benchmark.

Whisper writes "Press 1, then #." where a reference says "press one then
pound"; counting that as errors measures formatting, not recognition.  Both
sides therefore go through openai-whisper's ``EnglishTextNormalizer`` (the
``whisper-normalizer`` package: lowercase, no punctuation or hesitations,
contractions expanded, spelled-out numbers as digits, British spellings
Americanized), and ``jiwer`` counts the word edits.

A few spellings are made equal first, where the Whisper normalizer turns
two spellings of the same words into different words: the keypad symbols
``#`` and ``*`` (dropped by it) read as "pound" and "star"; an ellipsis (it
leaves a "." word behind) as a space; "cannot" as "can not" (what it makes of
"can't"); "a.m."/"p.m." as "am"/"pm" (it makes "a m" of the dotted form).

Needs the ``test`` extra (``pip install 'sub300[test]'``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

_SAME_WORDS = [
    (re.compile(r"#"), " pound "),
    (re.compile(r"\*"), " star "),
    (re.compile(r"\.{2,}|…"), " "),
    (re.compile(r"\bcannot\b", re.IGNORECASE), "can not"),
    (re.compile(r"\b([ap])\.m\b\.?", re.IGNORECASE), r"\1m"),
]


@lru_cache(maxsize=1)
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()  # reads its spelling table once


def normalize(text: str) -> str:
    """Whisper's English normalization (after the few equalities above)."""
    for pattern, replacement in _SAME_WORDS:
        text = pattern.sub(replacement, text)
    return _normalizer()(text)


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference), both sides normalized.

    A reference that normalizes to nothing counts every hypothesis word as an insertion.
    """
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return len(hyp.split()), 0
    if not hyp:
        return len(ref.split()), len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Corpus word error rate: all edits over all reference words."""
    errors = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        e, n = word_errors(ref, hyp)
        errors += e
        words += n
    return errors / max(1, words)
