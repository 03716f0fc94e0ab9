"""Redaction: what is masked before it reaches an audit row or a log line.

A `Redactor` masks values under sensitive keys (SAGA_REDACT_KEYS plus the defaults, compared
without case or separators), passwords in URLs and inline ``key=value`` secrets in free text,
and Luhn-valid card numbers anywhere but inside UUIDs;
`install_log_redaction` applies the same masking to every log record of a process.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

REDACTED = "***REDACTED***"

#: Characters ignored when keys are compared: `X-Api-Key`, `api_key` and `apiKey` are one key.
_SEPARATORS = re.compile(r"[-_.\s]")

# Every expression below is linear in the length of the text (possessive quantifiers and
# atomic groups, Python 3.11+): an error message is attacker-influenced and can be megabytes.
# The old `[\w-]*(?:keys)[\w-]*` backtracked over every start position of a long word
# (digits, letters, dashes): 20k characters took 7 s, 50k took half a minute.

#: `scheme://user:password@host`: the password, up to the last @ before a / or whitespace.
_URL_PASSWORD = re.compile(
    r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*+://[^\s/?#@:]*+:)([^\s/?#]*)(?=@)"
)
#: A canonical UUID (a Celery task id): never a card number, whatever digits it holds.
_UUID = re.compile(
    r"(?i)(?<![0-9a-z])[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?![0-9a-z])"
)
#: A run of digit groups separated by single spaces or dashes; cards are found inside it.
_DIGIT_RUN = re.compile(r"(?<!\d)\d++(?:[ -]\d++)*+")
_GROUP = re.compile(r"\d++")
_CARD_MIN, _CARD_MAX = 13, 19


def normalise_key(key: str) -> str:
    """A key as redaction compares it: lower case, without `-`, `_`, `.` or spaces."""
    return _SEPARATORS.sub("", key.lower())


class Redactor:
    """Masks values under sensitive keys, passwords in URLs, inline ``key=value`` secrets and
    card numbers in text.

    A key is sensitive when its normalised form (`normalise_key`) contains a normalised
    configured key: `api_key` covers `api-key`, `X-Api-Key` and `apiKey`.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(dict.fromkeys(n for n in (normalise_key(k) for k in keys) if n))
        # In text a key may carry separators between any two letters (`X-Api-Key`).
        loose = ["[-_.]?".join(re.escape(ch) for ch in k) for k in self.keys]
        alternatives = "|".join(loose) or r"(?!)"
        # key=value, key: value, "key": "value" inside free text such as error messages.
        # The atomic group commits to a word's first key occurrence: no backtracking. A quoted
        # value runs to its closing quote, escaped quotes included.
        self._inline = re.compile(
            rf"""(?ix)
            (?<![\w-])
            (["']?(?>[\w-]*?(?:{alternatives}))[\w-]*+["']?\s*+[:=]\s*+)
            ("(?:[^"\\]|\\.)*+"|'(?:[^'\\]|\\.)*+'|(?:(?:bearer|basic|token|digest)\s+)?[^\s,;}}&]+)
            """
        )

    def is_sensitive(self, key: str) -> bool:
        normalised = normalise_key(key)
        return any(k in normalised for k in self.keys)

    def value(self, value: Any) -> Any:
        """A redacted deep copy of a JSON value."""
        if isinstance(value, Mapping):
            return {
                k: (REDACTED if self.is_sensitive(str(k)) else self.value(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and _CARD_MIN <= len(str(abs(value))) <= _CARD_MAX
        ):
            return self.text(str(value)) if _luhn_ok(str(abs(value))) else value
        return value

    def text(self, text: str | None) -> str | None:
        """Free text with URL passwords, inline secrets and card numbers masked."""
        if not text:
            return text
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)
        text = self._inline.sub(lambda m: m.group(1) + REDACTED, text)
        return mask_cards(text)


def mask_cards(text: str) -> str:
    """Luhn-valid runs of 13-19 digits (single spaces or dashes allowed between groups)
    masked but for their last four digits; UUIDs (Celery task ids) are left whole."""
    parts: list[str] = []
    position = 0
    for uuid in _UUID.finditer(text):
        parts.append(_DIGIT_RUN.sub(_mask_run, text[position : uuid.start()]))
        parts.append(uuid.group(0))
        position = uuid.end()
    parts.append(_DIGIT_RUN.sub(_mask_run, text[position:]))
    return "".join(parts)


def _mask_run(match: re.Match[str]) -> str:
    """Mask each card inside one run: a window of whole groups holding 13-19 digits that
    passes Luhn, the longest first from each group, left to right."""
    run = match.group(0)
    if len(run) <= _CARD_MAX and run.isdigit():  # the usual case: one group, no separators
        if len(run) >= _CARD_MIN and _luhn_ok(run):
            return "*" * (len(run) - 4) + run[-4:]
        return run
    groups = [(g.start(), g.end()) for g in _GROUP.finditer(run)]
    digits = "".join(run[start:end] for start, end in groups)
    if len(digits) < _CARD_MIN:
        return run
    luhn = _LuhnSums(digits)
    # ends[g]: digits up to the end of group g; a window of groups i..j holds
    # ends[j] - ends[i - 1] digits.
    ends = list(accumulate(end - start for start, end in groups))
    out: list[str] = []
    written = 0  # index in `run` up to which `out` holds the text
    i = 0
    while i < len(groups):
        first = ends[i - 1] if i else 0
        found = luhn.longest(ends, i, first)
        if found is None:
            i += 1
            continue
        card = digits[first : ends[found]]
        out.append(run[written : groups[i][0]])
        out.append("*" * (len(card) - 4) + card[-4:])
        written = groups[found][1]
        i = found + 1
    out.append(run[written:])
    return "".join(out)


_DOUBLED = str.maketrans("0123456789", "0246813579")  # Luhn's doubled digit, 9s cast out


class _LuhnSums:
    """Prefix sums over a digit string, so that the Luhn check of any slice is O(1): a run
    of a million one-digit groups has millions of candidate windows."""

    def __init__(self, digits: str) -> None:
        # [parity] -> prefix sums over the positions of that parity, plain and doubled.
        self.plain = [list(accumulate(map(int, digits[p::2]), initial=0)) for p in (0, 1)]
        doubled = digits.translate(_DOUBLED)
        self.doubled = [list(accumulate(map(int, doubled[p::2]), initial=0)) for p in (0, 1)]

    def longest(self, ends: list[int], i: int, start: int) -> int | None:
        """The last group of the longest Luhn-valid window of 13-19 digits that starts at
        digit `start` (group i) and ends where a group ends; None if there is none.

        Luhn of digits[start:end]: the last digit and every second one leftwards plain, the
        others doubled. Inlined: this runs for every group of a run."""
        plain, doubled = self.plain, self.doubled
        shortest = bisect_left(ends, start + _CARD_MIN, i)
        for j in range(bisect_right(ends, start + _CARD_MAX, i) - 1, shortest - 1, -1):
            end = ends[j]
            last = (end - 1) % 2
            other = 1 - last
            kept, twice = plain[last], doubled[other]
            total = (
                kept[(end - last + 1) // 2]
                - kept[(start - last + 1) // 2]
                + twice[(end - other + 1) // 2]
                - twice[(start - other + 1) // 2]
            )
            if total % 10 == 0:
                return j
        return None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record's message before it is emitted.

    Install it on the handlers of a process (`install_log_redaction`) so that an error
    message carrying ``password=...`` or a card number is masked in logs as in the audit.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        masked = self.redactor.text(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks quote exception messages (and SQL parameters): mask them as text.
            formatted = logging.Formatter().formatException(record.exc_info)
            masked = f"{masked}\n{self.redactor.text(formatted)}"
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = masked, ()
        return True


def install_log_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(redactor))
