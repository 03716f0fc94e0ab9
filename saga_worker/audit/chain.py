"""The per-saga SHA-256 hash chain: how an audit row is encoded, hashed and linked.

Everything here is the definition an auditor recomputes (docs/audit.md, "Hash definition",
named by `AUDIT_HASH_SPEC`): the canonical JSON (RFC 8785, `jcs`), the timestamp format, the
hashed columns, and `build_rows`, which turns one transition's audit events into rows
chained from the saga's previous head. Changing any byte hashed here needs a new spec
version. Rows written before v2 keep their v1 hashes (`legacy_row_hash`): verification
accepts either definition per row (`hash_scheme`), so a chain begun under v1 and continued
under v2 verifies end to end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..core.decision import AuditEvent
from .jcs import JCSError, canonicalize
from .redaction import Redactor

GENESIS_HASH = "0" * 64
#: Name, version and summary of `row_hash`, recorded in export manifests (docs/audit.md,
#: "Hash definition"). Change the version whenever the hashed bytes change.
AUDIT_HASH_SPEC = (
    "saga_worker audit hash v2: SHA-256 hex of the UTF-8 bytes of the RFC 8785 (JSON "
    "Canonicalization Scheme) serialization of the JSON object of every column but id and "
    "hash (prev_hash included), timestamp as ISO 8601 UTC with microseconds and +00:00; "
    "prev_hash links each saga's rows, 64 zeros for its first"
)
#: The definition of rows written before v2, which keep their hashes.
LEGACY_HASH_SPEC = (
    "saga_worker audit hash v1: as v2, but the JSON is Python's json.dumps with keys sorted "
    "by code point, no whitespace, non-ASCII kept, duration_ms a float"
)
#: Largest integer magnitude a double holds exactly with its neighbours (I-JSON, RFC 7493).
MAX_EXACT_INT = 2**53 - 1

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


def canonical_json(value: Any) -> str:
    """RFC 8785 (JCS): the encoding the hash is taken over. Raises `JCSError` (a ValueError)
    on what JCS cannot serialize (NaN, a lone surrogate, a non-string key)."""
    return canonicalize(value)


def legacy_canonical_json(value: Any) -> str:
    """The v1 encoding (keys sorted by code point, no whitespace, non-ASCII kept); also an
    exact text form of JSON values where no hash is involved (CSV cells)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_utc(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a +00:00 offset."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def _payload(row: Mapping[str, Any]) -> dict[str, Any]:
    payload = {}
    for column in HASHED_COLUMNS:
        value = row.get(column)
        if isinstance(value, datetime):
            value = iso_utc(value)
        payload[column] = value
    return payload


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex of a row's hashed columns (`AUDIT_HASH_SPEC`); anyone can recompute it."""
    return hashlib.sha256(canonical_json(_payload(row)).encode("utf-8")).hexdigest()


def legacy_row_hash(row: Mapping[str, Any]) -> str:
    """The v1 hash (`LEGACY_HASH_SPEC`) of rows written before v2."""
    return hashlib.sha256(legacy_canonical_json(_payload(row)).encode("utf-8")).hexdigest()


def hash_scheme(row: Mapping[str, Any]) -> str | None:
    """Which definition the row's `hash` matches its content under: "v2", "v1" (a row
    written before v2), or None when neither (the row was modified)."""
    stored = row.get("hash")
    try:
        if row_hash(row) == stored:
            return "v2"
    except JCSError:
        pass  # not serializable by JCS: only a v1 row can hold it
    try:
        if legacy_row_hash(row) == stored:
            return "v1"
    except (TypeError, ValueError):
        pass
    return None


def exact_numbers(value: Any) -> Any:
    """A JSON value whose integers beyond +-(2**53 - 1) are decimal strings.

    JCS reads every number as a double, so such an integer would hash like its neighbours
    and could be changed unseen; as a string it is kept and covered exactly.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value) if abs(value) > MAX_EXACT_INT else value
    if isinstance(value, Mapping):
        return {k: exact_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [exact_numbers(v) for v in value]
    return value


#: Events whose audit row carries the saga's context after the transition (redacted): the
#: start, every event that may change the context, the end, and a rejected start (its
#: submitted context, bounded). Other rows leave it null: the saga's context at any row is
#: that of the last row before it that has one.
SNAPSHOT_EVENTS = frozenset(
    {
        "saga_start",
        "step_complete",
        "compensation_complete",
        "signal_received",
        "saga_migrated",
        "saga_complete",
        "saga_compensated",
        "saga_aborted",
        "saga_failed",
        "saga_rejected",
    }
)


def build_rows(
    saga_id: str,
    context: Mapping[str, Any],
    events: Iterable[AuditEvent],
    now: datetime,
    prev_hash: str,
    redactor: Redactor,
) -> list[dict[str, Any]]:
    """Audit rows of one transition, chained from `prev_hash`; the last one is the new head.

    `context` is the saga's context after the transition (the snapshot, redacted here),
    written on the rows of SNAPSHOT_EVENTS only.
    """
    snapshot: Any = None
    rows: list[dict[str, Any]] = []
    for event in events:
        if snapshot is None and event.event_type in SNAPSHOT_EVENTS:
            # Redacted once, and only for a transition that has a row carrying it.
            snapshot = exact_numbers(redactor.value(dict(context)))
        # Only rows of events that change the context, start or end a saga carry it
        # (DESIGN section 4): a step_start copied the context of the row before it.
        row: dict[str, Any] = {
            "saga_id": saga_id,
            "event_type": event.event_type,
            "step_name": event.step_name,
            "step_index": event.step_index,
            "event_data": exact_numbers(redactor.value(dict(event.event_data))),
            "context_snapshot": snapshot if event.event_type in SNAPSHOT_EVENTS else None,
            "error_message": redactor.text(event.error_message),
            "error_stack_trace": redactor.text(event.error_stack_trace),
            "timestamp": now,
            # float() so the Float column reads back what was written (JCS writes 12.0 as 12).
            "duration_ms": (
                None if event.duration_ms is None else float(round(event.duration_ms, 3))
            ),
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
