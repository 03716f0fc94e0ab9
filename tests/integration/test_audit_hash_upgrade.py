"""A database migrated to the current head, holding rows hashed under audit hash v1 (what
releases before v2 wrote), continued by this release under v2 (RFC 8785): the whole chain
verifies, from the database and from an export file, and the manifest names both schemes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from saga_worker.audit.archive import AuditArchive, verify_export_file
from saga_worker.audit.chain import (
    AUDIT_HASH_SPEC,
    GENESIS_HASH,
    LEGACY_HASH_SPEC,
    hash_scheme,
    legacy_row_hash,
    row_hash,
)
from saga_worker.audit.redaction import Redactor
from saga_worker.core.decision import AuditEvent, Decision
from saga_worker.core.model import Saga, SagaState
from saga_worker.store.codec import saga_to_row
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs, checkpoints

from .conftest import migrated_database

T0 = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
SAGA_ID = "upgraded-1"
# Values on which v1 and v2 differ, so that each row says which definition it was hashed with.
CONTEXT = {"ratio": 1e16, "tiny": 1e-7, "\U0001f600": "astral", "\ufb33": "dalet"}


def _v1_rows() -> list[dict[str, Any]]:
    """Three rows as the previous release wrote them (hash v1)."""
    rows = []
    prev = GENESIS_HASH
    for i, kind in enumerate(["saga_start", "step_start", "step_complete"]):
        row: dict[str, Any] = {
            "saga_id": SAGA_ID,
            "event_type": kind,
            "step_name": None if i == 0 else "fetch",
            "step_index": None if i == 0 else 0,
            "event_data": {"attempt": 1, "timeout_seconds": 30.0},
            "context_snapshot": CONTEXT,
            "error_message": None,
            "error_stack_trace": None,
            "timestamp": T0 + timedelta(microseconds=i),
            "duration_ms": 12.0 if kind == "step_complete" else None,
            "user_id": "ops",
            "ip_address": None,
            "saga_state_before": None if i == 0 else "RUNNING",
            "saga_state_after": "RUNNING",
            "retry_count": None,
            "prev_hash": prev,
        }
        row["hash"] = prev = legacy_row_hash(row)
        assert row["hash"] != row_hash(row)
        rows.append(row)
    return rows


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_v1_rows_of_a_migrated_database_verify_with_the_v2_rows_after_them(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    admin = request.getfixturevalue("pg_admin_url") if backend == "postgres" else ""
    url = migrated_database(backend, admin, tmp_path)
    store = SagaStore(create_db_engine(url), Redactor([]))
    legacy = _v1_rows()
    saga = Saga(
        saga_id=SAGA_ID,
        saga_type="upgraded",
        state=SagaState.RUNNING,
        context=CONTEXT,
        current_step_index=1,
        total_steps=2,
        started_at=T0,
        updated_at=T0,
        attempts=(),
    )
    with store.engine.begin() as conn:
        conn.execute(insert(audit_logs), legacy)
        conn.execute(
            insert(checkpoints),
            [{**saga_to_row(saga), "version": 3, "audit_head": legacy[-1]["hash"]}],
        )

    # This release continues the chain (hash v2).
    def finish(current: Saga) -> Decision:
        done = replace(current, state=SagaState.COMPLETED, current_step_index=2)
        event = AuditEvent("saga_complete", SagaState.RUNNING, SagaState.COMPLETED)
        return Decision(done, (event,))

    applied = store.apply(SAGA_ID, finish, T0 + timedelta(seconds=1))
    assert applied is not None and applied.committed is not None
    trail = store.audit_trail(SAGA_ID)
    assert [hash_scheme(r) for r in trail] == ["v1", "v1", "v1", "v2"]
    assert trail[3]["prev_hash"] == legacy[-1]["hash"]

    archive = AuditArchive(store, "test database", lambda: T0 + timedelta(days=1))
    report = archive.verify()
    assert report.ok, report.problems
    assert report.legacy_rows == 3 and report.rows == 4
    assert any("v1" in note for note in report.notes)
    assert archive.verify(SAGA_ID).ok

    export = archive.export("jsonl", path=tmp_path / "all.jsonl")
    manifest = json.loads(Path(str(export.manifest)).read_text(encoding="utf-8"))
    assert manifest["hash"] == AUDIT_HASH_SPEC and manifest["legacy_hash"] == LEGACY_HASH_SPEC
    from_file = verify_export_file(tmp_path / "all.jsonl")
    assert from_file.ok, from_file.problems
    assert from_file.legacy_rows == 3
    store.engine.dispose()
