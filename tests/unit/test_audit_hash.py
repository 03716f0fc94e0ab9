"""The audit hash v2 (RFC 8785) and the rows written under v1 before it (issue 14 item 8).

An auditor recomputes v2 with any JCS library: here the independent `rfc8785` package.
Rows already in a database keep their v1 hashes and still verify, and a chain that starts
under v1 and goes on under v2 verifies end to end.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import rfc8785

from saga_worker.audit.chain import (
    AUDIT_HASH_SPEC,
    GENESIS_HASH,
    HASHED_COLUMNS,
    LEGACY_HASH_SPEC,
    build_rows,
    hash_scheme,
    legacy_row_hash,
    row_hash,
)
from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import MODIFIED, ChainVerifier, verify_chain
from saga_worker.core.decision import AuditEvent
from saga_worker.core.model import SagaState

TS = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)


def _row(prev: str = GENESIS_HASH, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(HASHED_COLUMNS)
    row.update(
        saga_id="bt-1",
        event_type="step_complete",
        step_name="fetch",
        step_index=0,
        event_data={"ratio": 1e16, "tiny": 1e-7, "neg_zero": -0.0, "\U0001f600": "astral"},
        context_snapshot={"\ufb33": 1, "\U0001f600": 2, "quote": 'a"b\\c\n', "n": 2**53 - 1},
        timestamp=TS,
        duration_ms=12.0,
        saga_state_before="RUNNING",
        saga_state_after="RUNNING",
        prev_hash=prev,
    )
    row.update(changes)
    return row


def auditor_hash(row: dict[str, Any]) -> str:
    """docs/audit.md's recipe with an independent JCS library: no saga_worker code."""
    payload = {k: v for k, v in row.items() if k not in ("id", "hash")}
    payload["timestamp"] = payload["timestamp"].isoformat(timespec="microseconds")
    return hashlib.sha256(rfc8785.dumps(payload)).hexdigest()


def v1_hash(row: dict[str, Any]) -> str:
    """The hash saga_worker wrote before v2 (json.dumps, keys sorted by code point)."""
    payload = {k: v for k, v in row.items() if k not in ("id", "hash")}
    payload["timestamp"] = payload["timestamp"].isoformat(timespec="microseconds")
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_row_hash_is_sha256_of_the_rfc_8785_serialization() -> None:
    row = _row()
    assert row_hash(row) == auditor_hash(row)
    # The awkward values make v1 and v2 differ: these rows need the scheme to verify.
    assert row_hash(row) != v1_hash(row)
    assert legacy_row_hash(row) == v1_hash(row)


def test_the_hash_spec_names_rfc_8785_and_the_legacy_one_v1() -> None:
    assert AUDIT_HASH_SPEC.startswith("saga_worker audit hash v2")
    assert "RFC 8785" in AUDIT_HASH_SPEC
    assert LEGACY_HASH_SPEC.startswith("saga_worker audit hash v1")


def test_hash_scheme_tells_which_definition_a_row_was_hashed_with() -> None:
    v2 = _row()
    v2["hash"] = row_hash(v2)
    v1 = _row()
    v1["hash"] = v1_hash(v1)
    assert hash_scheme(v2) == "v2"
    assert hash_scheme(v1) == "v1"
    assert hash_scheme({**v1, "duration_ms": 13.0}) is None
    # A row JCS cannot serialize (a lone surrogate) can still be a v1 row.
    odd = _row(error_message="\ud800")
    odd["hash"] = hashlib.sha256(b"x").hexdigest()
    assert hash_scheme(odd) is None


def _event(kind: str, data: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent(
        event_type=kind,
        state_before=SagaState.RUNNING,
        state_after=SagaState.RUNNING,
        step_name="fetch",
        step_index=0,
        event_data=data or {},
    )


def test_a_chain_written_under_v1_then_continued_under_v2_verifies_end_to_end() -> None:
    rows: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for i in range(3):  # what the database holds from before the upgrade
        row = _row(prev, retry_count=i)
        row["hash"] = prev = v1_hash(row)
        row["id"] = i + 1
        rows.append(row)
    new = build_rows("bt-1", {"x": 1e16}, [_event("step_start")] * 2, TS, prev, Redactor([]))
    for i, row in enumerate(new, start=4):
        row["id"] = i
    rows += new
    assert [hash_scheme(r) for r in rows] == ["v1", "v1", "v1", "v2", "v2"]
    assert verify_chain(rows) == []
    verifier = ChainVerifier()
    for row in rows:
        verifier.add(row)
    assert verifier.ok and verifier.legacy_rows == 3
    # Tampering is caught in either part of the chain.
    for index in (1, 3):
        tampered = [dict(r) for r in rows]
        tampered[index]["retry_count"] = 99
        problems = verify_chain(tampered)
        assert [(p.row_id, p.kind) for p in problems] == [(index + 1, MODIFIED)]


def test_integers_a_double_cannot_hold_are_stored_as_strings_in_audit_rows() -> None:
    """JCS reads every number as a double: 2**53 + 1 would hash like 2**53, so a forger
    could change it unseen. Audit rows keep such integers as decimal strings."""
    big = 2**53 + 1
    (row,) = build_rows(
        "bt-1",
        {"order": big, "nested": [{"n": -big}], "ok": 2**53 - 1},
        [_event("step_complete", {"amount": 10**30})],
        TS,
        GENESIS_HASH,
        Redactor([]),
    )
    assert row["context_snapshot"] == {
        "order": str(big),
        "nested": [{"n": str(-big)}],
        "ok": 2**53 - 1,
    }
    assert row["event_data"] == {"amount": str(10**30)}
    assert row["hash"] == auditor_hash(row)
