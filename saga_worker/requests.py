"""Validation of what callers ask for: producer messages (saga.start / saga.abort /
saga.signal) and operators' votes into core events, and the time range of an operator's list
or export filter."""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .audit.chain import iso_utc
from .config import Settings
from .core.events import (
    AbortRequested,
    MigrateRequested,
    RetryRequested,
    SignalReceived,
    StartRequested,
    VoteCast,
)
from .core.stages import SIGNAL_RE
from .errors import InvalidFilter, InvalidRequest

SAGA_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,255}")
START_FIELDS = frozenset({"saga_type", "context", "saga_id", "user_id", "ip_address"})
ABORT_FIELDS = frozenset({"saga_id", "reason", "user_id", "ip_address"})
SIGNAL_FIELDS = frozenset({"saga_id", "signal", "payload", "user_id", "ip_address"})
#: A signal's payload as JSON, at most: a signal that arrives early is kept in the saga's
#: checkpoint until its wait begins.
MAX_SIGNAL_PAYLOAD_BYTES = 16384
MAX_TEXT = 255
MAX_REASON = 2000
# JSON can escape a lone UTF-16 surrogate ("\ud800"), which Python decodes into a str that
# neither UTF-8 nor the database can hold: refused where it arrives, naming the field.
NOT_UTF8 = "is not valid Unicode text: it cannot be encoded as UTF-8 (a lone surrogate?)"
#: The width of the ip_address columns (IPv6 with an IPv4 tail is 45 characters).
MAX_IP = 45
# C0 controls and DEL: PostgreSQL refuses NUL in text, and the others garble the terminals
# and log viewers that show an audit row. Prose (a reason, a context string) may keep tabs
# and line breaks; names and ids (saga_type, user_id, context keys) may not.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NO_CONTROLS = "must not contain control characters"
NO_CONTROLS_BUT_WHITESPACE = "must not contain control characters but tab and line breaks"


def valid_saga_id(value: object) -> bool:
    return isinstance(value, str) and SAGA_ID_RE.fullmatch(value) is not None


def has_controls(text: str, *, allow_whitespace: bool = False) -> bool:
    """Whether `text` holds a control character (tab, CR and LF allowed with the flag)."""
    pattern = _CONTROL_BUT_WHITESPACE if allow_whitespace else _CONTROL
    return pattern.search(text) is not None


def encodable(text: str) -> bool:
    """Whether `text` can be encoded as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def start_saga_id(kwargs: Mapping[str, Any], message_id: object) -> object:
    """The saga_id a start names: its own, or else the start message's Celery task id.

    The task id stays the same when the broker redelivers the message or Celery retries the
    task, so one message can never start two sagas, and the producer knows the id
    (`send_task(...).id`) without choosing one.
    """
    given = kwargs.get("saga_id")
    return message_id if given is None else given


def parse_start(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], settings: Settings, message_id: object
) -> StartRequested:
    """A `StartRequested` from saga.start's arguments, or InvalidRequest naming field and rule.

    `message_id` is the start message's task id, the saga_id when the message names none.
    """
    _no_positional(args, "saga.start")
    _known_fields(kwargs, START_FIELDS, "saga.start")
    saga_id = start_saga_id(kwargs, message_id)
    if not valid_saga_id(saga_id):
        if kwargs.get("saga_id") is None:
            raise InvalidRequest(
                "saga_id",
                "is absent and the message's task id is not a usable saga_id "
                "(1-255 characters of A-Z a-z 0-9 . _ : -): pass saga_id explicitly",
            )
        raise InvalidRequest("saga_id", "must be 1-255 characters of A-Z a-z 0-9 . _ : -")
    assert isinstance(saga_id, str)
    saga_type = kwargs.get("saga_type")
    if not isinstance(saga_type, str) or not saga_type:
        raise InvalidRequest("saga_type", "is required and must be a non-empty string")
    if has_controls(saga_type):
        raise InvalidRequest("saga_type", NO_CONTROLS)
    if not encodable(saga_type):
        raise InvalidRequest("saga_type", NOT_UTF8)
    if "context" not in kwargs:
        raise InvalidRequest("context", "is required (a JSON object, {} for none)")
    context = kwargs["context"]
    check_context(context, settings, "context")
    return StartRequested(
        saga_id=saga_id,
        saga_type=saga_type,
        context=context,
        user_id=_optional_text(kwargs, "user_id"),
        ip_address=_optional_ip(kwargs),
    )


def parse_abort(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, AbortRequested]:
    """(saga_id, AbortRequested) from saga.abort's arguments."""
    _no_positional(args, "saga.abort")
    _known_fields(kwargs, ABORT_FIELDS, "saga.abort")
    saga_id = kwargs.get("saga_id")
    if not valid_saga_id(saga_id):
        raise InvalidRequest("saga_id", "is required: 1-255 characters of A-Z a-z 0-9 . _ : -")
    reason = _reason(kwargs.get("reason", ""))
    assert isinstance(saga_id, str)
    return saga_id, AbortRequested(
        reason=reason or "abort requested",
        user_id=_optional_text(kwargs, "user_id"),
        ip_address=_optional_ip(kwargs),
    )


def parse_signal(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], settings: Settings
) -> tuple[str, SignalReceived]:
    """(saga_id, SignalReceived) from saga.signal's arguments, checked as saga.start's are."""
    _no_positional(args, "saga.signal")
    _known_fields(kwargs, SIGNAL_FIELDS, "saga.signal")
    saga_id = kwargs.get("saga_id")
    if not valid_saga_id(saga_id):
        raise InvalidRequest("saga_id", "is required: 1-255 characters of A-Z a-z 0-9 . _ : -")
    assert isinstance(saga_id, str)
    signal = kwargs.get("signal")
    if not isinstance(signal, str) or not SIGNAL_RE.fullmatch(signal):
        raise InvalidRequest("signal", f"is required and must match {SIGNAL_RE.pattern}")
    payload = kwargs.get("payload", {})
    if payload is None:
        payload = {}
    check_context(payload, settings, "payload")
    size = len(json.dumps(payload, ensure_ascii=False).encode())
    if size > MAX_SIGNAL_PAYLOAD_BYTES:
        raise InvalidRequest(
            "payload", f"is {size} bytes as JSON, over the limit of {MAX_SIGNAL_PAYLOAD_BYTES}"
        )
    return saga_id, SignalReceived(
        signal=signal,
        payload=payload,
        user_id=_optional_text(kwargs, "user_id"),
        ip_address=_optional_ip(kwargs),
    )


def parse_vote(user_id: object, approve: bool, wait: object, reason: object) -> VoteCast:
    """An operator's vote on an approval: who (required), which wait (optional), why."""
    who = _optional_text({"user_id": user_id}, "user_id")
    if who is None:
        raise InvalidRequest("user_id", f"is required: 1-{MAX_TEXT} characters")
    if wait is not None and (not isinstance(wait, str) or not SIGNAL_RE.fullmatch(wait)):
        raise InvalidRequest("wait", f"must match {SIGNAL_RE.pattern}")
    return VoteCast(approve=approve, user_id=who, wait=wait, reason=_reason(reason or ""))


def parse_retry(user_id: object, reason: object, *, force: bool = False) -> RetryRequested:
    """An operator's RetryRequested, its fields checked as saga.abort's are."""
    who = _optional_text({"user_id": user_id}, "user_id")
    if who is None:
        raise InvalidRequest("user_id", f"is required: 1-{MAX_TEXT} characters")
    return RetryRequested(user_id=who, reason=_reason(reason) or "operator retry", force=force)


def parse_migrate(user_id: object, reason: object, mapping: object) -> MigrateRequested:
    """An operator's MigrateRequested: who, why, and a map of old step names to new ones,
    as a mapping or as `OLD=NEW` strings (the CLI's --map)."""
    who = _optional_text({"user_id": user_id}, "user_id")
    if who is None:
        raise InvalidRequest("user_id", f"is required: 1-{MAX_TEXT} characters")
    return MigrateRequested(_step_map(mapping), who, _reason(reason) or "operator migration")


def _step_map(value: object) -> dict[str, str]:
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = [(old, new) for old, _, new in (str(p).partition("=") for p in value)]
    else:
        raise InvalidRequest("map", "must map step names to step names (OLD=NEW)")
    mapping: dict[str, str] = {}
    for old, new in pairs:
        if not (isinstance(old, str) and isinstance(new, str) and old.strip() and new.strip()):
            raise InvalidRequest("map", f"{old}={new} is not OLD=NEW (two step names)")
        if old.strip() in mapping:
            raise InvalidRequest("map", f"step {old.strip()} is mapped twice")
        mapping[old.strip()] = new.strip()
    return mapping


def _reason(value: object) -> str:
    # Tabs and line breaks are text; other control characters (NUL above all, which
    # PostgreSQL cannot store) are not.
    if not isinstance(value, str) or len(value) > MAX_REASON:
        raise InvalidRequest("reason", f"must be a string of at most {MAX_REASON} characters")
    if has_controls(value, allow_whitespace=True):
        raise InvalidRequest("reason", NO_CONTROLS_BUT_WHITESPACE)
    if not encodable(value):
        raise InvalidRequest("reason", NOT_UTF8)
    return value


def check_context(value: object, settings: Settings, field: str) -> None:
    """A JSON object within the size and nesting limits, or InvalidRequest."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(field, f"must be a JSON object, got {type(value).__name__}")
    _check_json(value, field, 1, settings.max_context_depth)
    size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode())
    if size > settings.max_context_bytes:
        raise InvalidRequest(
            field,
            f"is {size} bytes as JSON, over the limit of {settings.max_context_bytes} "
            "(SAGA_MAX_CONTEXT_BYTES)",
        )


def _check_json(value: object, field: str, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise InvalidRequest(
            field, f"nests deeper than {max_depth} levels (SAGA_MAX_CONTEXT_DEPTH)"
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest(field, "object keys must be strings")
            if has_controls(key):
                raise InvalidRequest(field, f"object keys {NO_CONTROLS} (key {key[:40]!r})")
            if not encodable(key):
                raise InvalidRequest(field, f"has an object key that {NOT_UTF8}")
            _check_json(item, field, depth + 1, max_depth)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, field, depth + 1, max_depth)
    elif isinstance(value, str):
        if has_controls(value, allow_whitespace=True):
            raise InvalidRequest(field, f"strings {NO_CONTROLS_BUT_WHITESPACE}")
        if not encodable(value):
            raise InvalidRequest(field, f"has a string that {NOT_UTF8}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(field, "numbers must be finite (no NaN or Infinity)")
    elif value is not None and not isinstance(value, str | int | bool):
        raise InvalidRequest(field, f"holds a {type(value).__name__}, which is not JSON")


def _no_positional(args: tuple[Any, ...], task: str) -> None:
    if args:
        raise InvalidRequest("args", f"{task} takes keyword arguments only (kwargs=...)")


def _known_fields(kwargs: Mapping[str, Any], allowed: frozenset[str], task: str) -> None:
    extra = sorted(str(k) for k in kwargs if k not in allowed)
    if extra:
        raise InvalidRequest(
            extra[0], f"unknown argument for {task}; allowed: {', '.join(sorted(allowed))}"
        )


def _optional_text(kwargs: Mapping[str, Any], field: str) -> str | None:
    value = kwargs.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT:
        raise InvalidRequest(field, f"must be a string of 1-{MAX_TEXT} characters")
    if has_controls(value):
        raise InvalidRequest(field, NO_CONTROLS)
    if not encodable(value):
        raise InvalidRequest(field, NOT_UTF8)
    return value


def _optional_ip(kwargs: Mapping[str, Any]) -> str | None:
    value = kwargs.get("ip_address")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("ip_address", "must be an IPv4 or IPv6 address string")
    # ipaddress accepts any text as an IPv6 scope id ("fe80::1%..."): the column does not.
    if len(value) > MAX_IP or has_controls(value):
        raise InvalidRequest(
            "ip_address", f"must be at most {MAX_IP} characters without control characters"
        )
    try:
        # validated, then kept as sent: the audit records what the producer said
        ipaddress.ip_address(value)
        return value
    except ValueError:
        raise InvalidRequest(
            "ip_address", f"{value[:60]!r} is not an IPv4 or IPv6 address"
        ) from None


def check_time_range(since: datetime | None, until: datetime | None) -> None:
    """`InvalidFilter` unless `since` comes before `until` (either may be left open)."""
    if since is not None and until is not None and since >= until:
        raise InvalidFilter(f"--since ({iso_utc(since)}) must be before --until ({iso_utc(until)})")
