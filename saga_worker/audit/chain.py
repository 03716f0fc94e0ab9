"""The per-saga SHA-256 hash chain: how an audit row is encoded, hashed and linked.

Everything here is the definition an auditor recomputes (docs/audit.md, "Hash definition",
named by `AUDIT_HASH_SPEC`): the canonical JSON, the timestamp format, the hashed columns,
and `build_rows`, which turns one transition's audit events into rows chained from the
saga's previous head. Changing any byte hashed here needs a new spec version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..core.decision import AuditEvent
from .redaction import Redactor

GENESIS_HASH = "0" * 64
#: Name, version and summary of `row_hash`, recorded in export manifests (docs/audit.md,
#: "Hash definition"). Change the version whenever the hashed bytes change.
AUDIT_HASH_SPEC = (
    "saga_worker audit hash v1: SHA-256 hex of the UTF-8 bytes of the JSON object of every "
    "column but id and hash (prev_hash included), keys sorted, no whitespace, non-ASCII kept, "
    "timestamp as ISO 8601 UTC with microseconds and +00:00, duration_ms a float; "
    "prev_hash links each saga's rows, 64 zeros for its first"
)

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
    """Keys sorted, no whitespace, non-ASCII kept: the encoding the hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_utc(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a +00:00 offset."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex of a row's hashed columns (`AUDIT_HASH_SPEC`); anyone can recompute it."""
    payload = {}
    for column in HASHED_COLUMNS:
        value = row.get(column)
        if isinstance(value, datetime):
            value = iso_utc(value)
        payload[column] = value
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def build_rows(
    saga_id: str,
    context: Mapping[str, Any],
    events: Iterable[AuditEvent],
    now: datetime,
    prev_hash: str,
    redactor: Redactor,
) -> list[dict[str, Any]]:
    """Audit rows of one transition, chained from `prev_hash`; the last one is the new head.

    `context` is the saga's context after the transition (the snapshot, redacted here).
    """
    snapshot = redactor.value(dict(context))
    rows: list[dict[str, Any]] = []
    for event in events:
        row: dict[str, Any] = {
            "saga_id": saga_id,
            "event_type": event.event_type,
            "step_name": event.step_name,
            "step_index": event.step_index,
            "event_data": redactor.value(dict(event.event_data)),
            "context_snapshot": snapshot,
            "error_message": redactor.text(event.error_message),
            "error_stack_trace": redactor.text(event.error_stack_trace),
            "timestamp": now,
            # float() so an int from a remote worker hashes as the Float column reads back.
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
