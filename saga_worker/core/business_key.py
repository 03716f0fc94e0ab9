"""A saga's business key: the id people search by (an order id, a booking reference).

A definition may name one, as a context key (`business_key="order_id"`) or as a function of
the start context. It is computed once, when the saga starts, and never changes; it is
stored in an indexed column so the CLI and the console find a saga by it
(`saga-worker list --key`).

A key is a lookup aid, not a part of the saga's work: whatever the context holds or the
function does, computing it never stops a start. A value that cannot be a key (a float, an
empty string, control characters, over 255 characters, a function that raises) gives none.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

#: The width of the `saga_checkpoints.business_key` column.
MAX_BUSINESS_KEY = 255
#: C0 controls and DEL, as refused in ids and names elsewhere (PostgreSQL refuses NUL, and
#: the others garble the terminals that show a key).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: A function of the start context that returns the key (or None for none).
KeyFunction = Callable[[Mapping[str, Any]], "str | None"]
#: What `SagaDefinition(business_key=...)` takes: a context key name, or a function.
BusinessKey = str | KeyFunction


def key_name_problem(name: object) -> str | None:
    """Why `name` cannot be the context key a business key is read from (None: it can).

    The same rules as the keys of a start's context (no control characters, valid UTF-8),
    and not empty: a key no context can hold would silently give no saga a key.
    """
    if not isinstance(name, str):
        return f"must be a str or a function, got {type(name).__name__}"
    if not name or len(name) > MAX_BUSINESS_KEY:
        return f"must be a context key name of 1-{MAX_BUSINESS_KEY} characters, got {name!r}"
    if _CONTROL.search(name) or not _encodable(name):
        return f"must not contain control characters or lone surrogates, got {name!r}"
    return None


def key_text(value: object) -> str | None:
    """`value` as a business key: a string or an integer, as text, when it fits the column;
    None for anything else (bool, float, empty, control characters, over 255 characters)."""
    if isinstance(value, bool):
        return None  # an int to Python, never an identifier
    if isinstance(value, int):
        if value.bit_length() > 4 * MAX_BUSINESS_KEY:  # far over 255 digits: skip str()
            return None
        value = str(value)
    if not isinstance(value, str):
        return None
    if not value or len(value) > MAX_BUSINESS_KEY:
        return None
    if _CONTROL.search(value) or not _encodable(value):
        return None
    return value


def business_key_of(option: BusinessKey | None, context: Mapping[str, Any]) -> str | None:
    """The business key of a saga starting with `context` under a definition's `option`.

    Never raises an `Exception`: a function that raises, or returns anything but a string
    `key_text` accepts, gives None. The function gets a deep copy of the context, so it
    cannot change what the saga starts with.
    """
    if option is None:
        return None
    if isinstance(option, str):
        return key_text(context.get(option))
    try:
        found = option(copy.deepcopy(dict(context)))
    except Exception:  # the function's problem, not the start's
        return None
    return key_text(found) if isinstance(found, str) else None


def key_shape(option: BusinessKey | None) -> dict[str, Any] | None:
    """What the version fingerprint covers of the option: the context key's name, or only
    that a function computes it (as with local steps, not the function's code)."""
    if option is None:
        return None
    if isinstance(option, str):
        return {"context_key": option}
    return {"function": True}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
