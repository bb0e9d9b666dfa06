"""English text normalization for word error rate, in the spirit of Whisper's.

Whisper writes "Press 1, then #." where a reference says "press one then
pound"; counting that as errors measures formatting, not recognition.  This is
a compact reimplementation of the ideas of openai-whisper's
EnglishTextNormalizer (not a copy): lowercase; drop bracketed annotations and
hesitations; expand common contractions and titles; turn spelled-out numbers
into digits ("twenty one" → "21", "first" → "1st"); spell out a few symbols;
strip the remaining punctuation; collapse whitespace.  Apply it to both the
reference and the hypothesis, then compare word lists (`wer`).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

_CONTRACTIONS = [
    (r"\bwon't\b", "will not"),
    (r"\bcan't\b", "can not"),
    (r"\bcannot\b", "can not"),
    (r"\bshan't\b", "shall not"),
    (r"\blet's\b", "let us"),
    (r"\bain't\b", "aint"),
    (r"\by'all\b", "you all"),
    (r"\bwanna\b", "want to"),
    (r"\bgonna\b", "going to"),
    (r"\bgotta\b", "got to"),
    (r"\bma'am\b", "madam"),
    (r"n't\b", " not"),
    (r"'re\b", " are"),
    (r"'s\b", " is"),
    (r"'d\b", " would"),
    (r"'ll\b", " will"),
    (r"'ve\b", " have"),
    (r"'m\b", " am"),
]
_TITLES = [
    (r"\bmr\.?(?=\s)", "mister"),
    (r"\bmrs\.?(?=\s)", "missus"),
    (r"\bms\.?(?=\s)", "miss"),
    (r"\bdr\.?(?=\s)", "doctor"),
    (r"\bst\.(?=\s)", "saint"),
    (r"\ba\.m\.?", "am"),
    (r"\bp\.m\.?", "pm"),
    (r"\be-mail\b", "email"),
    (r"\bvoice-mail\b", "voicemail"),
    (r"\bok\b", "okay"),
]
_FILLERS = re.compile(r"\b(?:hmm+|mm+|mhm|um+|uh+|ah|er|erm)\b")

_ONES = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
# "second" is left alone: "one second please" is not "1 2nd".
_ORDINALS = {
    "first": 1, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fourteenth": 14,
    "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18, "nineteenth": 19,
    "twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50, "sixtieth": 60,
    "seventieth": 70, "eightieth": 80, "ninetieth": 90, "hundredth": 100, "thousandth": 1000,
    "millionth": 1_000_000,
}
_NUMBER_WORDS = set(_ONES) | set(_TENS) | set(_SCALES) | set(_ORDINALS)


def _ordinal_suffix(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _numbers_to_digits(words: Sequence[str]) -> list[str]:
    """Join runs of number words into digits; separate digits stay separate ("one two" → "1 2")."""
    out: list[str] = []
    total = current = 0
    active = False

    def flush(ordinal: bool = False) -> None:
        nonlocal total, current, active
        if active:
            value = total + current
            out.append(f"{value}{_ordinal_suffix(value) if ordinal else ''}")
        total = current = 0
        active = False

    def add(value: int) -> None:  # a value below 100
        nonlocal current, active
        low = current % 100
        if active and (
            (low == 0 and (current or total)) or (value < 10 and low >= 20 and low % 10 == 0)
        ):
            current += value
        else:
            flush()
            current, active = value, True

    def scale(factor: int) -> None:
        nonlocal total, current, active
        if factor == 100:
            current = (current or 1) * 100 if current % 100 else current + 100 * (current == 0)
        else:
            total, current = total + (current or 1) * factor, 0
        active = True

    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "zero":
            flush()
            out.append("0")
        elif w in _ONES or w in _TENS:
            add(_ONES.get(w, _TENS.get(w, 0)))
        elif w in _SCALES and active:
            scale(_SCALES[w])
        elif w in _ORDINALS:
            value = _ORDINALS[w]
            if value >= 100:
                if not active:
                    current, active = 1, True
                scale(value)
            else:
                add(value)
            flush(ordinal=True)
        elif w == "and" and active and current % 100 == 0 and (nxt in _ONES or nxt in _TENS) and nxt != "zero":
            continue  # "one hundred and five"
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalize(text: str) -> str:
    """Normalize English text for WER (see module doc)."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = s.replace("\u2019", "'").replace("\u2018", "'")
    s = re.sub(r"[<\[][^>\]]*[>\]]", " ", s)  # [beep], <noise>
    s = re.sub(r"\([^)]*\)", " ", s)  # (laughs)
    for pattern, repl in _CONTRACTIONS + _TITLES:
        s = re.sub(pattern, repl, s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    s = re.sub(r"\$(\d+(?:\.\d+)?)", r"\1 dollars", s)
    s = re.sub(r"(\d)\s*%", r"\1 percent", s)
    s = s.replace("&", " and ").replace("@", " at ").replace("#", " pound ").replace("+", " plus ")
    s = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", s)  # twenty-one, call-forward
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # keep 3.5, drop sentence periods
    s = s.replace("'", "")  # o'clock -> oclock, as Whisper's normalizer does
    s = re.sub(r"[^\w\s.]", " ", s)  # all other punctuation and symbols
    s = s.replace("_", " ")
    s = _FILLERS.sub(" ", s)
    words = s.split()
    words = _numbers_to_digits(words)
    # "21 st" written apart, "1 st" → "1st"
    joined: list[str] = []
    for w in words:
        if joined and w in ("st", "nd", "rd", "th") and joined[-1].isdigit():
            joined[-1] += w
        else:
            joined.append(w)
    return " ".join(joined)


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Iterable[str], hyps: Iterable[str], *, normalized: bool = False) -> float:
    """Corpus WER: total word errors over total reference words (after `normalize`)."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r = (ref if normalized else normalize(ref)).split()
        h = (hyp if normalized else normalize(hyp)).split()
        errors += edit_distance(r, h)
        words += len(r)
    return errors / words if words else 0.0
