"""Turn a piece of an LLM reply into the words a person would say, for TTS.

`spoken_form(text) -> str` takes one piece (a sentence or clause, as cut by
`sentences.SentenceSplitter`) and returns plain English words and ordinary
punctuation, which Piper/espeak-ng then read without surprises.  It is used
only on the way to TTS: the history keeps what the model wrote.

What it does, in this order (each step sees the previous step's output, so a
URL, once spelled out, is no longer a number or a symbol):

1. emoji and other pictographs are dropped, with their skin-tone modifiers,
   variation selectors (U+FE0E/U+FE0F), ZWJ sequences, flags and tag
   sequences; a keycap (``1️⃣``) keeps its digit.  The `emoji` package knows
   the sequences of the current Unicode Emoji standard (UTS #51); what it does
   not know and is a symbol (Unicode category ``So``) is dropped too.
2. markdown formatting is removed, never content (`strip_markdown`).
3. URLs and e-mail addresses are read as people read them:
   ``example.com/help`` → "example dot com slash help",
   ``jane.doe@example.com`` → "jane dot doe at example dot com"; the scheme
   (``https://``) is not read.
4. money (``$3.50`` → "three dollars and fifty cents", ``€20``, ``£5``,
   ``$2.5 million``, ``$5k``, ``100 EUR``), times (``9 a.m.``, ``9:30 pm``,
   ``14:05`` → "fourteen oh five"), ISO dates, percentages, ordinals,
   numbers with units (``5 km``, ``10kg``, ``72°F``), ranges (``3-5 days`` →
   "three to five days"), fractions (``1/2`` → "one half"), phone numbers
   (digit by digit), years (``1999`` → "nineteen ninety-nine" where it reads as a
   year, see `_is_year`), decimals, negative numbers and plain numbers.
   Words come from `num2words` (English).
5. symbols that carry meaning are read: ``&`` "and", ``a * b`` "a times b",
   ``=`` "equals", ``+`` "plus", ``C#`` "C sharp", ``#5`` "number five",
   ``@name`` "at name", ``help_center`` "help underscore center" (an identifier
   is spelled as written, so the caller could type it), ``e.g.`` "for example".

Errors: none; unknown characters pass through unchanged.
"""
from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable

import emoji
from num2words import num2words

__all__ = ["UNIT_NAMES", "number_words", "spoken_form", "strip_markdown"]


# ------------------------------------------------------------------ numbers
def _words(value: int | float | str, to: str = "cardinal") -> str:
    """num2words without the commas it puts after "thousand" (TTS would pause)."""
    return str(num2words(value, lang="en", to=to)).replace(",", "")


def number_words(digits: str) -> str:
    """A number as written (``"1,200"``, ``"-3.14"``, ``"007"``) → words.

    Integers with a leading zero or of 7+ digits without grouping commas are
    read digit by digit (codes, IDs); decimals as "three point one four".
    """
    text = digits.replace(",", "").replace("\u2212", "-")
    sign = ""
    if text[:1] in "+-":
        sign = "minus " if text[0] == "-" else "plus "
        text = text[1:]
    if "." in text:
        whole, _, frac = text.partition(".")
        head = _words(int(whole)) if whole else "zero"
        return sign + head + " point " + " ".join(_DIGITS[d] for d in frac)
    if (len(text) > 1 and text.startswith("0")) or (len(text) >= 7 and "," not in digits):
        return sign + " ".join(_DIGITS[d] for d in text)
    return sign + _words(int(text))


_DIGITS = {str(i): _words(i) for i in range(10)}
_DIGITS["0"] = "zero"


def _digits_read(text: str) -> str:
    return " ".join(_DIGITS[d] for d in text if d.isdigit())


def _value(text: str) -> float:
    return float(text.replace(",", ""))


# ------------------------------------------------------------------ emoji
_KEYCAP = re.compile("([0-9#*])\ufe0f?\u20e3")
_INVISIBLE = re.compile("[\ufe00-\ufe0f\u200d\u20e3\U000e0000-\U000e007f\U0001f3fb-\U0001f3ff]")
_KEEP_SYMBOLS = set("°©®™")


_EMOTICON = re.compile(r"(?<!\S)(?:[:;=][-'^]?[)(DPpOo3/\\|*\]\[]+|<3+|\^_*\^|[xX]D|¯\\_\(ツ\)_/¯)(?!\S)")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")


def _drop_emoji(text: str) -> str:
    text = _KEYCAP.sub(r"\1", text)
    text = emoji.replace_emoji(text, replace=" ")
    text = _INVISIBLE.sub("", text)
    text = _EMOTICON.sub(" ", text)
    return "".join(" " if unicodedata.category(c) == "So" and c not in _KEEP_SYMBOLS else c for c in text)


# ------------------------------------------------------------------ markdown
# CommonMark (https://spec.commonmark.org/0.31.2/): emphasis needs a
# left-flanking opener and a right-flanking closer (§6.2), so "a * b" and
# "help_center" are not emphasis; "_" inside a word never is.
_MD_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*$", re.MULTILINE)
_MD_RULE = re.compile(r"^[ \t]*([-*_])([ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_MD_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_MD_QUOTE = re.compile(r"^[ \t]*>[ \t]?", re.MULTILINE)
_MD_BULLET = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+", re.MULTILINE)
_MD_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$", re.MULTILINE)
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_MD_AUTOLINK = re.compile(r"<((?:https?://|mailto:)[^>\s]+)>")
_MD_CODE = re.compile(r"(`+)(.+?)\1")
_MD_STRONG = re.compile(r"(?<![\w*])(\*\*|__)(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_MD_EMPH_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])")
_MD_EMPH_UNDER = re.compile(r"(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])")
_MD_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")

_MD_STRAY_RUN = re.compile(r"\*{2,}|_{2,}|~{2,}")


def _stray_run(match: re.Match[str]) -> str:
    """An unmatched ``**``/``__``/``~~`` is markup, unless it sits between operands (``2 ** 3``)."""
    before, after = match.string[: match.start()].rstrip(" \t"), match.string[match.end():].lstrip(" \t")
    if match.group() == "**" and re.search(r"[\w)\]]$", before) and re.match(r"[\w(\[-]", after):
        return match.group()
    return ""


def _emphasised(match: re.Match[str]) -> str:
    """The text inside emphasis marks; a "span" of marks only (``*****``) is no emphasis."""
    inner = match.group(match.lastindex or 0)
    return inner if re.search(r"\w", inner) else match.group()


def strip_markdown(text: str) -> str:
    """Remove markdown formatting, keep every word and every content symbol.

    ``**bold**``/``*em*``/``_em_``/``~~strike~~`` → their text; headings,
    list bullets (``- ``, ``* ``, ``1. ``), block quotes, rules, code fences and
    table rules go; inline code and links keep their text (``[text](url)`` →
    text).  Lines are kept (the splitter uses them); spaces are not collapsed.
    """
    code: list[str] = []  # inline code is content: kept out of the emphasis rules, put back at the end

    def keep(match: re.Match[str]) -> str:
        code.append(match.group(2).strip())
        return f"\ue000{len(code) - 1}\ue001"

    text = _MD_FENCE.sub("", text)
    text = _MD_CODE.sub(keep, text)
    text = _MD_RULE.sub("", text)
    text = _MD_TABLE_RULE.sub("", text)
    text = _MD_HEADING.sub(r"\1", text)
    text = _MD_QUOTE.sub("", text)
    text = _MD_BULLET.sub("", text)
    text = _MD_IMAGE.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_AUTOLINK.sub(r"\1", text)
    for pattern in (_MD_STRONG, _MD_STRONG, _MD_EMPH_STAR, _MD_EMPH_UNDER, _MD_STRIKE):
        text = pattern.sub(_emphasised, text)
    text = _MD_STRAY_RUN.sub(_stray_run, text)
    text = re.sub(r"[ \t]*\|[ \t]*", lambda m: ", " if m.start() else "", text) if text.count("|") >= 2 else text
    return re.sub("\ue000(\\d+)\ue001", lambda m: code[int(m.group(1))], text)


# ------------------------------------------------------------------ URLs and e-mail
_TLDS = ("com|org|net|edu|gov|io|ai|dev|app|co|uk|us|de|fr|es|it|nl|eu|ca|au|in|jp|info|biz|me|tv|ly|gg|xyz|"
         "tech|cloud|site|online|store|shop")
_EMAIL = re.compile(r"(?<![\w.+-])(?:mailto:)?([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)")
_URL = re.compile(
    r"(?<![\w@/.-])(?:(?:https?|ftp)://[^\s<>\"']+|www\.[^\s<>\"']+|"
    rf"(?:[a-z0-9-]+\.)+(?:{_TLDS})(?![\w-])(?:[/?#][^\s<>\"']*)?)",
    re.IGNORECASE)
_URL_SYMBOLS = {".": " dot ", "/": " slash ", "-": " dash ", "_": " underscore ", "@": " at ",
                "?": " question mark ", "=": " equals ", "&": " and ", "#": " hash ", ":": " colon ",
                "+": " plus ", "~": " tilde ", "%": " percent "}

_FILE_NAME = re.compile(r"(?<=\w)\.(txt|py|js|ts|json|ya?ml|toml|csv|pdf|docx?|xlsx?|pptx?|png|jpe?g|gif|svg|md|"
                        r"html?|css|wav|mp3|mp4|zip|tar|gz|exe|sh|log|ini|cfg|sql|java|cpp|rs|go)\b", re.IGNORECASE)


def _say_address(text: str) -> str:
    out = re.sub(r"[./\-_@?=&#:+~%]", lambda m: _URL_SYMBOLS[m.group()], text)
    out = re.sub(r"\d+", lambda m: f" {number_words(m.group()) if len(m.group()) <= 4 else _digits_read(m.group())} ", out)
    return re.sub(r"\s+", " ", out).strip()


def _say_email(match: re.Match[str]) -> str:
    return f"{_say_address(match.group(1))} at {_say_address(match.group(2))}"


def _say_url(match: re.Match[str]) -> str:
    url = match.group()
    trail = re.search(r"[.,;:!?)\]'\"]+$", url)
    tail = ""
    if trail:
        url, tail = url[: trail.start()], trail.group()
    url = re.sub(r"^(?:https?|ftp)://", "", url, flags=re.IGNORECASE).rstrip("/")
    if url.lower().startswith("www."):
        url = "w w w." + url[4:]
    return _say_address(url) + tail


# ------------------------------------------------------------------ money
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SCALE = r"(?:\s?(?P<scale>thousand|million|billion|trillion|[kKmMbB]|bn|mn|tn)\b)?"
_CURRENCIES = {  # symbol / ISO 4217 code → (unit, units, subunit, subunits)
    "$": ("dollar", "dollars", "cent", "cents"), "USD": ("US dollar", "US dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"), "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"), "GBP": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "sen", "sen"), "JPY": ("yen", "yen", "sen", "sen"),
    "₹": ("rupee", "rupees", "paisa", "paise"), "INR": ("rupee", "rupees", "paisa", "paise"),
    "CHF": ("Swiss franc", "Swiss francs", "centime", "centimes"),
    "CAD": ("Canadian dollar", "Canadian dollars", "cent", "cents"),
    "AUD": ("Australian dollar", "Australian dollars", "cent", "cents"),
}
_SCALES = {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion", "tn": "trillion"}
_MONEY_PREFIX = re.compile(rf"(?P<neg>[-\u2212])?(?P<cur>[$€£¥₹])\s?(?P<num>{_NUM}){_SCALE}")
_MONEY_SUFFIX = re.compile(
    rf"(?<![\w.,])(?P<neg>[-\u2212])?(?P<num>{_NUM})(?:\s?(?P<cur>[€£¥₹])|{_SCALE}\s(?P<code>USD|EUR|GBP|JPY|INR|CHF|CAD|AUD)\b)")
_MONEY_CODE_FIRST = re.compile(rf"\b(?P<code>USD|EUR|GBP|JPY|INR|CHF|CAD|AUD)\s?(?P<num>{_NUM}){_SCALE}")


def _say_money(match: re.Match[str]) -> str:
    groups = match.groupdict()
    key = groups.get("cur") or groups.get("code") or "$"
    unit, units, sub, subs = _CURRENCIES[key]
    num = groups["num"]
    neg = "minus " if groups.get("neg") else ""
    scale = groups.get("scale")
    if scale:
        scale_word = _SCALES.get(scale.lower(), scale.lower())
        return f"{neg}{number_words(num)} {scale_word} {units}"
    whole, _, cents = num.replace(",", "").partition(".")
    main = int(whole)
    if cents and len(cents) <= 2 and key not in ("¥", "JPY"):
        cent_value = int(cents.ljust(2, "0"))
        if main == 0 and cent_value:
            return f"{neg}{_words(cent_value)} {sub if cent_value == 1 else subs}"
        head = f"{_words(main)} {unit if main == 1 else units}"
        if cent_value:
            return f"{neg}{head} and {_words(cent_value)} {sub if cent_value == 1 else subs}"
        return neg + head
    if cents:
        return f"{neg}{number_words(num)} {units}"
    return f"{neg}{number_words(whole)} {unit if main == 1 else units}"


# ------------------------------------------------------------------ times and dates
_TIME_AMPM = re.compile(r"\b(?P<h>1[0-2]|0?[1-9])(?::(?P<m>[0-5]\d))?\s?(?P<ap>[aApP])\.?\s?[mM]\b\.?")
_TIME_24 = re.compile(r"(?<![\d:.])(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?![\d:])")
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_ISO_DATE = re.compile(r"\b(?P<y>1[89]\d\d|20\d\d)-(?P<mo>0[1-9]|1[0-2])-(?P<d>0[1-9]|[12]\d|3[01])\b")
_MONTH_NAMES = {name[:3].lower(): name for name in _MONTHS}
_MONTH_DAY = re.compile(
    r"\b(?P<mon>January|February|March|April|May|June|July|August|September|October|November|December|"
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?\s(?P<d>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?\b(?!:|\.\d)")


def _minutes(m: str, o_clock: str) -> str:
    minute = int(m)
    if minute == 0:
        return o_clock
    if minute < 10:
        return " oh " + _words(minute)
    return " " + _words(minute)


def _say_time_ampm(match: re.Match[str]) -> str:
    suffix = " AM" if match.group("ap").lower() == "a" else " PM"
    hour = _words(int(match.group("h")))
    text = hour + (_minutes(match.group("m"), "") if match.group("m") else "") + suffix
    return text + ("." if match.group().endswith(".") and _ends_sentence(match) else "")


def _ends_sentence(match: re.Match[str]) -> bool:
    rest = match.string[match.end():]
    return not rest.strip() or bool(re.match(r"\s+[A-Z]", rest))


def _say_time_24(match: re.Match[str]) -> str:
    hour = int(match.group("h"))
    minute = int(match.group("m"))
    if minute == 0:
        return "midnight" if hour == 0 else (_words(hour) + (" o'clock" if hour <= 12 else " hundred"))
    head = "zero" if hour == 0 else _words(hour)
    return head + _minutes(match.group("m"), "")


_US_DATE = re.compile(r"\b(?P<a>[0-3]?\d)/(?P<b>[0-3]?\d)/(?P<y>\d{4})\b")
_PER_WORDS = {"hr": "hour", "h": "hour", "wk": "week", "mo": "month", "yr": "year", "min": "minute", "sec": "second",
              "kg": "kilogram", "lb": "pound", "g": "gram", "km": "kilometer", "mi": "mile", "ea": "each"}
_PER = re.compile(r"(?<=\w)\s?/\s?(hour|hr|h|day|night|week|wk|month|mo|year|yr|person|head|user|seat|unit|item|"
                  r"piece|kg|lb|g|km|mi|mile|minute|min|second|sec|page|word|serving|dose|ticket|ea)\b", re.IGNORECASE)


def _say_us_date(match: re.Match[str]) -> str:
    """m/d/yyyy (US order, as the voice is American) unless the first number cannot be a month."""
    a, b = int(match.group("a")), int(match.group("b"))
    if 1 <= a <= 12 and 1 <= b <= 31:
        return f"{_MONTHS[a - 1]} {_words(b, 'ordinal')}, {_say_year(match.group('y'))}"
    if 1 <= b <= 12 and 1 <= a <= 31:
        return f"the {_words(a, 'ordinal')} of {_MONTHS[b - 1]}, {_say_year(match.group('y'))}"
    return match.group()


def _say_iso_date(match: re.Match[str]) -> str:
    return (f"{_MONTHS[int(match.group('mo')) - 1]} {_words(int(match.group('d')), 'ordinal')} "
            f"{_say_year(match.group('y'))}")


def _say_year(digits: str) -> str:
    return _words(int(digits), "year")


# ------------------------------------------------------------------ units
_UNITS: dict[str, tuple[str, str]] = {
    "km": ("kilometer", "kilometers"), "m": ("meter", "meters"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "mi": ("mile", "miles"), "ft": ("foot", "feet"),
    "yd": ("yard", "yards"), "kg": ("kilogram", "kilograms"), "g": ("gram", "grams"),
    "mg": ("milligram", "milligrams"), "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"),
    "oz": ("ounce", "ounces"), "l": ("liter", "liters"), "L": ("liter", "liters"),
    "ml": ("milliliter", "milliliters"), "mL": ("milliliter", "milliliters"),
    "km/h": ("kilometer per hour", "kilometers per hour"), "kph": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"), "m/s": ("meter per second", "meters per second"),
    "KB": ("kilobyte", "kilobytes"), "kB": ("kilobyte", "kilobytes"), "MB": ("megabyte", "megabytes"),
    "GB": ("gigabyte", "gigabytes"), "TB": ("terabyte", "terabytes"),
    "Mbps": ("megabit per second", "megabits per second"), "Gbps": ("gigabit per second", "gigabits per second"),
    "Hz": ("hertz", "hertz"), "kHz": ("kilohertz", "kilohertz"), "MHz": ("megahertz", "megahertz"),
    "GHz": ("gigahertz", "gigahertz"), "W": ("watt", "watts"), "kW": ("kilowatt", "kilowatts"),
    "kWh": ("kilowatt hour", "kilowatt hours"), "V": ("volt", "volts"), "mAh": ("milliamp hour", "milliamp hours"),
    "ms": ("millisecond", "milliseconds"), "sec": ("second", "seconds"),
    "tsp": ("teaspoon", "teaspoons"), "tbsp": ("tablespoon", "tablespoons"),
    "min": ("minute", "minutes"), "h": ("hour", "hours"), "hr": ("hour", "hours"), "hrs": ("hour", "hours"),
    "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"), "º": ("degree", "degrees"),
}
UNIT_NAMES = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
_NUMBER_UNIT = re.compile(
    rf"(?<![\w.,])(?P<neg>[-\u2212])?(?P<num>{_NUM})(?P<sp>\s?)(?P<unit>{UNIT_NAMES})(?![\w/])")


def _say_unit(match: re.Match[str]) -> str:
    unit = match.group("unit")
    one, many = _UNITS[unit]
    num = match.group("num")
    neg = "minus " if match.group("neg") else ""
    return f"{neg}{number_words(num)} {one if _value(num) == 1 and '.' not in num else many}"


# ------------------------------------------------------------------ percentages, ordinals, ranges, fractions
_PERCENT = re.compile(rf"(?<![\w.,])(?P<neg>[-\u2212+])?(?P<num>{_NUM})\s?%")
_ORDINAL = re.compile(r"\b(?P<num>\d{1,3}(?:,\d{3})*|\d+)(?P<suf>st|nd|rd|th)\b", re.IGNORECASE)
_DECADE = re.compile(r"(?<![\w.,'])'?(?P<num>1[1-9]\d0|20\d0|[2-9]0)'?s\b")
_QUANTITY = r"[-\u2212]?[$€£¥₹]?\d[\d,]*(?:\.\d+)?(?::[0-5]\d)?(?:\s?[aApP]\.?[mM]\b\.?)?%?"
# "3-5 days", "$10-$20", "50-60%", "9am-5pm", "10:30-11:00", "1990-1995": the dash reads "to"
_RANGE_DASH = re.compile(rf"(?<![\w.,/-])(?P<a>{_QUANTITY})\s?[-–—]\s?(?=(?P<b>{_QUANTITY})(?![\w/-]|[.,]\d|\s*=))")
_PHONE = re.compile(r"(?<![\w])(?:\+\d{1,3}[\s.-]?|1[\s.-])?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b|\b\d{3}-\d{4}\b")
_FRACTION_CHARS = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅛": "1/8", "⅜": "3/8",
                   "⅝": "5/8", "⅞": "7/8", "⅕": "1/5"}
_FRACTION_CHAR = re.compile(rf"(?:(\d)\s?)?([{''.join(_FRACTION_CHARS)}])")
_FRACTION = re.compile(r"(?<![\w/.])(?:(?P<whole>\d+)(?:\s|-))?(?P<n>\d{1,3})/(?P<d>\d{1,3})(?![\w/]|\.\d)")


def _say_fraction(match: re.Match[str]) -> str:
    n, d = int(match.group("n")), int(match.group("d"))
    if d == 0:
        return f"{number_words(match.group('n'))} slash zero"
    if not match.group("whole") and (n >= d or d > 64 or d in (10, 20, 50)):  # "10/10", "7/10", "95/100": a score
        return f"{number_words(match.group('n'))} out of {number_words(match.group('d'))}"
    if d == 2:
        part = "one half" if n == 1 else f"{_words(n)} halves"
    elif d == 4:
        part = "one quarter" if n == 1 else f"{_words(n)} quarters"
    else:
        ordinal = _words(d, "ordinal")
        part = f"one {ordinal}" if n == 1 else f"{_words(n)} {ordinal}s"
    if match.group("whole"):
        return f"{number_words(match.group('whole'))} and {part}"
    return part


def _say_phone(match: re.Match[str]) -> str:
    groups = re.findall(r"\d+", match.group())
    plus = "plus " if match.group().lstrip().startswith("+") else ""
    return plus + ", ".join(_digits_read(g) for g in groups)


# ------------------------------------------------------------------ years
_YEAR_BEFORE = re.compile(
    r"\b(?:in|since|by|from|until|till|of|year|during|before|after|around|circa|early|late|mid|"
    r"spring|summer|autumn|fall|winter|January|February|March|April|May|June|July|August|September|"
    r"October|November|December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\.?,?\s+(?:(?:\d{1,2}(?:st|nd|rd|th)?|\w+(?:st|nd|rd|th))(?:,?\s+|,))?$",
    re.IGNORECASE)
_YEAR_AFTER = re.compile(
    r"^(?:\s*(?:$|[.,;:!?)\]\"']|BC\b|AD\b|BCE\b|CE\b)|\s+(?:was|were|is|will|saw|brought|had|has|marked|"
    r"and|or|to|through|when|while|where|with)\b)")
_DOTTED = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?![\w]|\.\d)")  # versions 2.0.1, IPv4 addresses
_RATIO = re.compile(r"(?<![\w:.])(\d+):(\d+)(?![\w:]|\.\d)")  # what is left after times: 3:2, 16:9
_DURATION = re.compile(r"(?<![\w:.])(\d+):([0-5]\d)(?::([0-5]\d))?(?![\w:]|\.\d)")  # 25:30, 1:30:15 (m:ss, h:mm:ss)
_HEIGHT = re.compile(r"(?<![\w.])([1-9])'\s?(1[01]|[0-9])(?:\"|''|″)")  # 6'2": feet and inches
_YEAR_PAIR = re.compile(r"\b(?:1\d{3}|20\d\d)\s+(?:to|and|or|through)\s+$")
_INTEGER = re.compile(r"(?<![\w.,])(?P<neg>[-\u2212+](?=\d))?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\w])")


def _is_plain_year(digits: str) -> bool:
    return len(digits) == 4 and digits.isdigit() and 1000 <= int(digits) <= 2099


def _is_year(match: re.Match[str]) -> bool:
    """A bare 4-digit 1100-2099 is read as a year after a date word ("in", "since",
    a month) or before an ending/verb ("1999 was", "2024."), else as a count
    ("1500 meters" → "one thousand five hundred meters")."""
    if match.group("neg") or not _is_plain_year(match.group("num")):
        return False
    before = match.string[: match.start()]
    after = match.string[match.end():]
    return bool(_YEAR_BEFORE.search(before) or _YEAR_AFTER.match(after) or _YEAR_PAIR.search(before))


def _say_number(match: re.Match[str]) -> str:
    if _is_year(match):
        return _say_year(match.group("num"))
    num = match.group("num")
    if num.startswith("."):
        num = "0" + num
    sign = match.group("neg") or ""
    if sign and sign != "+":
        before = match.string[: match.start()]
        if before and not re.search(r"(?:^|[\s(\[=:,])$", before):
            return "-" + number_words(num)  # a hyphen inside a token, not a minus
    return number_words(sign.replace("\u2212", "-") + num)


# ------------------------------------------------------------------ symbols
_LATIN_ABBREVIATIONS = [
    (re.compile(r"\be\.g\.,?(?=\s|$)", re.IGNORECASE), "for example,"),
    (re.compile(r"\bi\.e\.,?(?=\s|$)", re.IGNORECASE), "that is,"),
    (re.compile(r"\betc\.(?=\s+[a-z])"), "et cetera"),
    (re.compile(r"\betc\.", re.IGNORECASE), "et cetera."),
    (re.compile(r"\bvs\.?(?=\s)", re.IGNORECASE), "versus"),
    (re.compile(r"\b(?:No|no|Nr|nr)\.\s?(?=\d)"), "number "),
    (re.compile(r"(?<![\w&])#\s?(?=\d)"), "number "),
    (re.compile(r"(?<![\w&])#\s(?=of\b)"), "number "),
    (re.compile(r"\bapprox\.(?=\s)", re.IGNORECASE), "approximately"),
    (re.compile(r"\bext\.\s?(?=\d)", re.IGNORECASE), "extension "),
]
_NUMERIC_SYMBOLS = [  # need the digits, so they run before numbers become words
    (re.compile(r"(?<![\w~])~\s?(?=[-\u2212]?\d)"), "about "),
    (re.compile(r"(?<=\d)\s*[x×]\s*(?=\d)"), " times "),
    (re.compile(r"(?<=\d)[xX](?!\w)"), " times"),
    (re.compile(r"(?<=\d)\s+[-\u2212]\s+(?=\d)"), " minus "),
    (re.compile(r"(?<=\d)\s+/\s+(?=\d)"), " divided by "),
    (re.compile(r"(?<=\d)/(?=\d)"), " slash "),
]
_SYMBOL_RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"\b([A-G])#(?![\w#])"), r"\1 sharp"),
    (re.compile(r"\b([A-G])♭"), r"\1 flat"),
    (re.compile(r"\b(F|J)\s?\+\+"), r"\1 plus plus"),
    (re.compile(r"\bC\+\+"), "C plus plus"),
    (re.compile(r"(?<![\w#])#(?=[A-Za-z]\w*)"), "hashtag "),
    (re.compile(r"(?<![\w.])@(?=\w)"), "at "),
    (re.compile(r"\s*&\s*"), " and "),
    (re.compile(r"\s@\s"), " at "),
    # an operator has space on both sides or on neither ("a * b", "2*3"); "*args" is not one
    (re.compile(r"(?<=[\w)\]])(?:\s+\*\*\s+|\*\*)(?=[\w(\[-])"), " to the power of "),
    (re.compile(r"(?<=[\w)\]])(?:\s+\*\s+|\*)(?=[\w(\[-])"), " times "),
    (re.compile(r"\s*×\s*"), " times "),
    (re.compile(r"\s*(?:→|->|⇒|=>)\s*"), " to "),
    (re.compile(r"\s*÷\s*"), " divided by "),
    (re.compile(r"\s*(?:≠|!=)\s*"), " is not equal to "),
    (re.compile(r"\s*(?:<=|≤)\s*"), " is less than or equal to "),
    (re.compile(r"\s*(?:>=|≥)\s*"), " is greater than or equal to "),
    (re.compile(r"(?<=[\w)])\s+<\s+(?=[\w(-])"), " is less than "),
    (re.compile(r"(?<=[\w)])\s+>\s+(?=[\w(-])"), " is greater than "),
    (re.compile(r"\s*(?:==|=)\s*"), " equals "),
    (re.compile(r"\s*±\s*"), " plus or minus "),
    (re.compile(r"\s*≈\s*"), " approximately "),
    (re.compile(r"(?<=\w)\s*\+\s*(?=[\w(])"), " plus "),
    (re.compile(r"(?<=[\w)])\s+[-−]\s+(?=\w+\s*(?:=|equals))"), " minus "),
    (re.compile(r"(?<=\w)\^(?=\w)"), " to the power of "),
    (re.compile(r"(?<=[A-Za-z0-9])_(?=[A-Za-z0-9])"), " underscore "),
    (re.compile(r"\band/or\b"), "and or"),
    (re.compile(r"(?<=\b[A-Za-z])/(?=[A-Za-z]\b)"), " "),  # I/O, A/B
    (re.compile(r"(?<=[A-Za-z])/(?=[A-Za-z])"), " or "),
    (re.compile(r"™|®|©"), ""),
    (re.compile(r"[*_#`~^|\\]"), " "),
]


# ------------------------------------------------------------------ the pipeline
def spoken_form(text: str) -> str:
    """The words TTS should say for ``text`` (one piece of a reply, any length).

    Returns a single line with single spaces; an empty string when nothing
    speakable is left (e.g. a piece of emoji only).
    """
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(_HTML_TAG.sub(" ", text))
    text = _drop_emoji(text)
    text = strip_markdown(text)
    text = re.sub(r"\s+", " ", text)
    text = _EMAIL.sub(_say_email, text)
    text = _URL.sub(_say_url, text)
    text = _FILE_NAME.sub(lambda m: " dot " + m.group(1), text)
    text = _FRACTION_CHAR.sub(lambda m: f" {m.group(1) or ''} {_FRACTION_CHARS[m.group(2)]} ", text)
    text = _PHONE.sub(_say_phone, text)
    text = _HEIGHT.sub(lambda m: f"{_words(int(m.group(1)))} foot {_words(int(m.group(2)))}", text)
    text = _ISO_DATE.sub(_say_iso_date, text)
    text = _US_DATE.sub(_say_us_date, text)
    text = _RANGE_DASH.sub(lambda m: m.group("a") + " to ", text)
    text = re.sub(r"([$€£¥₹])(\d[\d,.]*) to (?=\d)", r"\1\2 to \1", text)  # "$10-20": both are dollars
    text = _MONEY_PREFIX.sub(_say_money, text)
    text = _MONEY_CODE_FIRST.sub(_say_money, text)
    text = _MONEY_SUFFIX.sub(_say_money, text)
    text = _PER.sub(lambda m: " per " + _PER_WORDS.get(m.group(1).lower(), m.group(1)), text)
    text = _MONTH_DAY.sub(lambda m: f"{_MONTH_NAMES[m.group('mon').lower()[:3]]} {_words(int(m.group('d')), 'ordinal')}", text)
    text = _TIME_AMPM.sub(_say_time_ampm, text)
    text = _TIME_24.sub(_say_time_24, text)
    text = _PERCENT.sub(lambda m: number_words((m.group("neg") or "") + m.group("num")) + " percent", text)
    text = re.sub(r"\b24/7\b", "twenty-four seven", text)
    text = _FRACTION.sub(_say_fraction, text)
    text = _DECADE.sub(lambda m: _say_decade(m.group("num")), text)
    text = _NUMBER_UNIT.sub(_say_unit, text)
    text = _ORDINAL.sub(lambda m: _words(int(m.group("num").replace(",", "")), "ordinal"), text)
    for pattern, replacement in _LATIN_ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    text = _DOTTED.sub(lambda m: " dot ".join(number_words(part) for part in m.group().split(".")), text)
    text = _DURATION.sub(lambda m: " ".join(
        [number_words(m.group(1))] + [_minutes(g, "").strip() for g in m.groups()[1:] if g and int(g)]), text)
    text = _RATIO.sub(lambda m: f"{number_words(m.group(1))} to {number_words(m.group(2))}", text)
    for pattern, replacement in _NUMERIC_SYMBOLS:
        text = pattern.sub(replacement, text)
    text = _INTEGER.sub(_say_number, text)
    for rule, repl in _SYMBOL_RULES:
        text = rule.sub(repl, text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([.,;:!?…])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"\s+([)\]])", r"\1", text)
    text = re.sub(r"[\s,;:]+$", "", text)
    text = re.sub(r"^[\s.,;:!?…]+", "", text)
    text = text.strip()
    return text if re.search(r"\w", text) else ""


def _say_decade(digits: str) -> str:
    if len(digits) == 2:
        word = _words(int(digits))
    else:
        word = _say_year(digits)
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + "s"
