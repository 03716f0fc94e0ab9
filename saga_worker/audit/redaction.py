"""Redaction: what is masked before it reaches an audit row or a log line.

A `Redactor` masks values under sensitive keys (SAGA_REDACT_KEYS plus the defaults),
inline ``key=value`` secrets in free text, and Luhn-valid card numbers anywhere;
`install_log_redaction` applies the same masking to every log record of a process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***REDACTED***"

_CARD_RE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


class Redactor:
    """Masks values under sensitive keys and card numbers anywhere in text."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(k.lower() for k in keys if k)
        alternatives = "|".join(re.escape(k) for k in self.keys) or r"(?!)"
        # key=value, key: value, "key": "value" inside free text such as error messages.
        self._inline = re.compile(
            rf"""(?ix)
            (["']?[\w-]*(?:{alternatives})[\w-]*["']?\s*[:=]\s*)
            ("[^"]*"|'[^']*'|(?:(?:bearer|basic|token|digest)\s+)?[^\s,;}}&]+)
            """
        )

    def is_sensitive(self, key: str) -> bool:
        lowered = key.lower()
        return any(k in lowered for k in self.keys)

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
            and 13 <= len(str(abs(value))) <= 19
        ):
            return self.text(str(value)) if _luhn_ok(str(abs(value))) else value
        return value

    def text(self, text: str | None) -> str | None:
        """Free text with inline secrets and card numbers masked."""
        if not text:
            return text
        text = self._inline.sub(lambda m: m.group(1) + REDACTED, text)
        return _CARD_RE.sub(_mask_card, text)


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if not _luhn_ok(digits):
        return match.group(0)
    return "*" * (len(digits) - 4) + digits[-4:]


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
