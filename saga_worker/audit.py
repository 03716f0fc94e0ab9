"""Audit rows: redaction, the per-saga SHA-256 hash chain, and its verification."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .core.model import Saga
from .core.transition import AuditEvent

GENESIS_HASH = "0" * 64
REDACTED = "***REDACTED***"

#: Columns covered by the hash, in no particular order (the canonical JSON sorts keys).
HASHED_COLUMNS = (
    "saga_id",
    "event_type",
    "step_name",
    "step_index",
    "event_data",
    "context_snapshot",
    "error_message",
    "error_stack_trace",
    "timestamp",
    "duration_ms",
    "user_id",
    "ip_address",
    "saga_state_before",
    "saga_state_after",
    "retry_count",
    "prev_hash",
)

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


def canonical_json(value: Any) -> str:
    """Keys sorted, no whitespace, non-ASCII kept: the encoding the hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_utc(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a +00:00 offset."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex of a row's hashed columns (DESIGN.md §4); anyone can recompute it."""
    payload = {}
    for column in HASHED_COLUMNS:
        value = row.get(column)
        if isinstance(value, datetime):
            value = iso_utc(value)
        payload[column] = value
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def build_rows(
    saga: Saga,
    events: Iterable[AuditEvent],
    now: datetime,
    prev_hash: str,
    redactor: Redactor,
) -> list[dict[str, Any]]:
    """Audit rows of one transition, chained from `prev_hash`; the last one is the new head."""
    snapshot = redactor.value(dict(saga.context))
    rows: list[dict[str, Any]] = []
    for event in events:
        row: dict[str, Any] = {
            "saga_id": saga.saga_id,
            "event_type": event.event_type,
            "step_name": event.step_name,
            "step_index": event.step_index,
            "event_data": redactor.value(dict(event.event_data)),
            "context_snapshot": snapshot,
            "error_message": redactor.text(event.error_message),
            "error_stack_trace": redactor.text(event.error_stack_trace),
            "timestamp": now,
            "duration_ms": None if event.duration_ms is None else round(event.duration_ms, 3),
            "user_id": event.user_id,
            "ip_address": event.ip_address,
            "saga_state_before": event.state_before.value if event.state_before else None,
            "saga_state_after": event.state_after.value,
            "retry_count": event.retry_count,
            "prev_hash": prev_hash,
        }
        row["hash"] = row_hash(row)
        prev_hash = row["hash"]
        rows.append(row)
    return rows


@dataclass(frozen=True)
class ChainProblem:
    """One break found by `verify_chain`."""

    saga_id: str
    row_id: Any
    problem: str


def verify_chain(rows: Iterable[Mapping[str, Any]]) -> list[ChainProblem]:
    """Check every row's hash and its link to the previous row of the same saga.

    Rows must come in insertion order (by id). Detects a changed row (hash mismatch),
    and a deleted, inserted or reordered row (prev_hash not the previous row's hash).
    """
    heads: dict[str, str] = {}
    problems: list[ChainProblem] = []
    for row in rows:
        saga_id = row["saga_id"]
        expected_prev = heads.get(saga_id, GENESIS_HASH)
        if row_hash(row) != row.get("hash"):
            problems.append(
                ChainProblem(saga_id, row.get("id"), "hash does not match the row's content")
            )
        if row.get("prev_hash") != expected_prev:
            problems.append(
                ChainProblem(
                    saga_id,
                    row.get("id"),
                    "prev_hash does not match the previous row of this saga "
                    "(a row was deleted, inserted or moved before it)",
                )
            )
        heads[saga_id] = str(row.get("hash"))
    return problems
