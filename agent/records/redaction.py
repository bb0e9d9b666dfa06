"""Masks card numbers, phone numbers and e-mail addresses in text (stored transcripts, replies, log lines).

What is caught (``records.redact`` = card, phone, email):

* **Digit runs**, written as numerals or as spoken digit words, since the STT
  writes either ("4111 1111 1111 1111", "four one one one …"): tokens that
  are digit groups or the words zero/oh/one…nine (``double``/``triple`` X
  repeat X), joined by spaces, dashes, dots, parentheses or ", ", with an
  optional leading "+".  A run of **13–19 digits that passes the Luhn check**
  (ISO/IEC 7812-1 Annex B) is a card → ``[card]``; any other run of **7–15
  digits** (E.164 allows at most 15; 7 is the shortest local number in
  common use) is a phone number → ``[phone]``.
* **E-mail addresses**: ``local@domain.tld`` as written, and the spoken form
  the STT writes, ``name at example dot com`` → ``[email]``.

Not caught, by design or limit (documented in the README): numbers said as
number words ("four hundred fifteen", "fifty five"), a digit run broken by
another word ("four one one, uh, one"), a card number that fails the Luhn
check and is longer than 15 digits, e-mail spelled letter by letter.  Any
7+ digit run is masked as a phone number, so a long order number, a list
of years written "2019, 2020, 2021" or a number like 1.000.000 is masked
too: the rule errs toward privacy.  Amounts with thousands commas
("1,000,000") are not joined (no space after the comma).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

KINDS = ("card", "phone", "email")

_WORD_DIGITS = {"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_REPEAT = {"double": 2, "triple": 3}
_DIGIT_WORD = r"(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)"
_TOKEN = rf"(?:\d+|(?:(?:double|triple)\s+)?{_DIGIT_WORD}\b)"
_SEP = r"(?:\s*[-.]\s*|\s*\)\s*|\s*\(\s*|,\s+|\s+)"
_RUN = re.compile(rf"(?<![\w+])\+?\(?{_TOKEN}(?:{_SEP}{_TOKEN})*\)?", re.IGNORECASE)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_SPOKEN_EMAIL = re.compile(r"\b[A-Za-z0-9._-]+(?:\s+dot\s+[A-Za-z0-9_-]+)*\s+at\s+[A-Za-z0-9-]+"
                           r"(?:\s+dot\s+[A-Za-z0-9-]+)+\b", re.IGNORECASE)
_TOKENS = re.compile(rf"\d+|(?:(double|triple)\s+)?({_DIGIT_WORD})\b", re.IGNORECASE)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of ISO/IEC 7812-1 Annex B: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def digits_of(run: str) -> str:
    """The digits a run stands for: numerals as written, digit words as digits (``double five`` = 55)."""
    out = []
    for m in _TOKENS.finditer(run):
        if m.group(2) is None:
            out.append(m.group(0))
        else:
            out.append(_WORD_DIGITS[m.group(2).lower()] * _REPEAT.get((m.group(1) or "").lower(), 1))
    return "".join(out)


class Redactor:
    """Masks the chosen ``kinds`` (card | phone | email) in text."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self.kinds = frozenset(kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kinds {sorted(unknown)} (known: {', '.join(KINDS)})")

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def __call__(self, text: str | None) -> str | None:
        if not text or not self.kinds:
            return text
        if "email" in self.kinds:
            text = _EMAIL.sub("[email]", text)
            text = _SPOKEN_EMAIL.sub("[email]", text)
        if "card" in self.kinds or "phone" in self.kinds:
            text = _RUN.sub(self._digits, text)
        return text

    def _digits(self, match: re.Match[str]) -> str:
        digits = digits_of(match.group(0))
        if "card" in self.kinds and 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "[card]"
        if "phone" in self.kinds and 7 <= len(digits) <= 15:
            return "[phone]"
        return match.group(0)


def redact(text: str | None, kinds: Iterable[str] = KINDS) -> str | None:
    return Redactor(kinds)(text)


#: loggers whose lines carry no caller speech but many numbers: aiohttp's access log ("POST /offer HTTP/1.1"
#: 200 2521 — the status and the size read as a 7-digit phone number).  Only card and e-mail are masked there.
DIGIT_LOGGERS = ("aiohttp.access",)


class RedactingFilter(logging.Filter):
    """A logging filter that masks ``kinds`` in each record's formatted message (the record's ``msg``
    becomes the masked text, its ``args`` empty); exception text is not touched. Attach it to handlers.
    Lines of `DIGIT_LOGGERS` keep their phone-like digit runs (status codes, sizes, ports)."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        super().__init__()
        self.redactor = Redactor(kinds)
        self.digit_redactor = Redactor(set(kinds) - {"phone"})

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.digit_redactor if record.name in DIGIT_LOGGERS else self.redactor
        if redactor:
            try:
                message = record.getMessage()
            except Exception:   # a malformed record: logging reports it itself when it formats
                return True
            masked = redactor(message)
            if masked != message:
                record.msg, record.args = masked, ()
        return True
