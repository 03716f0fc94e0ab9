"""RFC 8785, the JSON Canonicalization Scheme (JCS): the bytes an audit row's hash covers.

An auditor's JCS library in any language produces the same text, so anyone recomputes a
row's hash without saga_worker. Standard library only; tested against an independent
implementation and the RFC's own examples (tests/unit/test_jcs.py).

- Objects: members sorted by their names' UTF-16 code units (not code points: a name with
  a character above U+FFFF sorts before U+E000-U+FFFF), no whitespace.
- Strings: only `"`, `\\` and U+0000-U+001F escaped (`\\b \\t \\n \\f \\r`, else
  `\\u00xx` in lower case); everything else as itself, in UTF-8.
- Numbers: IEEE 754 doubles written as ECMAScript's Number.prototype.toString writes them
  (`1e+21`, `1e-7`, `0.000001`, `-0` as `0`). An integer is the double nearest to it, so
  integers beyond 2**53 lose digits: saga_worker stores those as strings in audit rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_ESCAPE_TABLE = {
    **{code: f"\\u{code:04x}" for code in range(0x20)},
    **{ord(ch): text for ch, text in _ESCAPES.items()},
}


class JCSError(ValueError):
    """A value RFC 8785 cannot serialize: NaN or infinity, a number beyond the double range,
    a lone surrogate, a non-string object key, or a type JSON does not have."""


def canonicalize(value: Any) -> str:
    """The RFC 8785 serialization of a JSON value (encode it as UTF-8 to hash it)."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_string(value))
    elif isinstance(value, int | float):
        parts.append(number(value))
    elif isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise JCSError(f"object key {key!r} is not a string")
            items.append((_utf16_key(key), key, item))
        items.sort(key=lambda entry: entry[0])
        parts.append("{")
        for index, (_, key, item) in enumerate(items):
            if index:
                parts.append(",")
            parts.append(_string(key))
            parts.append(":")
            _write(item, parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write(item, parts)
        parts.append("]")
    else:
        raise JCSError(f"{type(value).__name__} is not a JSON value")


def _utf16_key(key: str) -> bytes:
    """The sort key of RFC 8785 section 3.2.3: the name's UTF-16 code units, big-endian
    bytes compare as the units do."""
    try:
        return key.encode("utf-16-be")
    except UnicodeEncodeError:
        raise JCSError(f"object key {key!r} holds a lone surrogate") from None


def _string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JCSError(f"string {text[:40]!r} holds a lone surrogate") from None
    return '"' + text.translate(_ESCAPE_TABLE) + '"'


def number(value: int | float) -> str:
    """ECMAScript's Number::toString of the double nearest to `value` (RFC 8785 3.2.2.3)."""
    try:
        x = float(value)
    except OverflowError:
        raise JCSError(f"integer {value} is beyond the range of a double") from None
    if not math.isfinite(x):
        raise JCSError(f"{value!r} is not a finite number")
    if x == 0:
        return "0"  # -0 too
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that read back as the same double, as ECMAScript
    # requires (both round correctly; the digits are the same).
    mantissa, _, exponent = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    leading_zeros = len(whole + fraction) - len(digits)
    digits = digits.rstrip("0")
    k = len(digits)
    # value = 0.digits x 10**n
    n = len(whole) + int(exponent or 0) - leading_zeros
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        power = f"e{'+' if e >= 0 else '-'}{abs(e)}"
        text = digits + power if k == 1 else digits[0] + "." + digits[1:] + power
    return sign + text
