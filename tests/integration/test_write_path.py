"""The one write path (store/write.py) on PostgreSQL and SQLite: each guard, all-or-nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select

from saga_worker.audit.chain import GENESIS_HASH, build_rows
from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import verify_chain
from saga_worker.core.decision import Decision
from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.core.rejection import rejected_start
from saga_worker.core.transition import start, transition
from saga_worker.errors import ConcurrencyConflict
from saga_worker.store.codec import saga_to_row
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs, checkpoints
from saga_worker.store.write import Write, Written, execute

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DEFINITION = SagaDefinition(
    "write_path",
    [Step("one", Remote("remote.one", "remote")), Step("two", Remote("remote.two", "remote"))],
)
REDACTOR = Redactor(())


def _started(saga_id: str = "w-1") -> Decision:
    return start(DEFINITION, StartRequested(saga_id, DEFINITION.saga_type, {"k": 1}), NOW)


def _counts(engine: Engine, saga_id: str) -> tuple[int, int]:
    with engine.connect() as conn:
        cps = conn.execute(
            select(func.count()).select_from(checkpoints).where(checkpoints.c.saga_id == saga_id)
        ).scalar_one()
        rows = conn.execute(
            select(func.count()).select_from(audit_logs).where(audit_logs.c.saga_id == saga_id)
        ).scalar_one()
    return int(cps), int(rows)


def _insert(decision: Decision, prev_hash: str = GENESIS_HASH) -> Write:
    saga = decision.saga
    rows = build_rows(saga.saga_id, saga.context, decision.audit, NOW, prev_hash, REDACTOR)
    return Write(
        saga.saga_id, {**saga_to_row(saga), "audit_head": rows[-1]["hash"]}, None, rows, prev_hash
    )


def test_a_new_saga_is_written_once_with_its_rows(engine: Engine) -> None:
    write = _insert(_started())
    with engine.begin() as conn:
        assert execute(conn, write) is Written.DONE
    with engine.begin() as conn:
        # Same saga_id again: the checkpoint exists, nothing more is written.
        assert execute(conn, write) is not Written.DONE
    assert _counts(engine, "w-1") == (1, len(write.rows))


def test_an_insert_on_a_moved_chain_head_writes_nothing(engine: Engine) -> None:
    store = SagaStore(engine, REDACTOR)
    assert store.record_rejection("w-1", (rejected_start("bad"),), {}, NOW)
    with engine.begin() as conn:
        # Rows built from genesis, but a rejection row is already there.
        assert execute(conn, _insert(_started())) is Written.HEAD_MOVED
    assert _counts(engine, "w-1") == (0, 1)
    # The store rebuilds from the real head: one chain, rejection first.
    assert store.create(_started(), NOW) is not None
    trail = store.audit_trail("w-1")
    assert [r["event_type"] for r in trail][:2] == ["saga_rejected", "saga_start"]
    assert verify_chain(trail) == []


def test_an_update_needs_the_version_it_was_decided_on(engine: Engine) -> None:
    store = SagaStore(engine, REDACTOR)
    created = store.create(_started(), NOW)
    assert created is not None
    event = StepSucceeded(0, Direction.FORWARD, 1, {"x": 1})
    applied = store.apply("w-1", lambda s: transition(DEFINITION, s, event, NOW), NOW)
    assert applied is not None and applied.committed is not None
    before = _counts(engine, "w-1")
    # A second writer decided on version 1 too: its write must not land, rows included.
    stale = transition(DEFINITION, created.saga, event, NOW)
    rows = build_rows("w-1", stale.saga.context, stale.audit, NOW, created.audit_head, REDACTOR)
    checkpoint = {**saga_to_row(stale.saga), "audit_head": rows[-1]["hash"]}
    with engine.begin() as conn:
        write = Write("w-1", checkpoint, 1, rows, created.audit_head)
        assert execute(conn, write) is Written.CONFLICT
    assert _counts(engine, "w-1") == before
    loaded = store.load_for_step("w-1")
    assert loaded is not None and loaded.saga.version == 2
    assert verify_chain(store.audit_trail("w-1")) == []


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_checkpoint_read_before_a_concurrent_write_is_a_conflict(engine: Engine) -> None:
    # Only PostgreSQL decides on a checkpoint read outside the write (the step's read).
    store = SagaStore(engine, REDACTOR)
    created = store.create(_started(), NOW)
    assert created is not None
    event = StepSucceeded(0, Direction.FORWARD, 1, {"x": 1})
    assert store.apply("w-1", lambda s: transition(DEFINITION, s, event, NOW), NOW)
    before = _counts(engine, "w-1")
    with pytest.raises(ConcurrencyConflict):
        store.apply(
            "w-1",
            lambda s: transition(DEFINITION, s, event, NOW),
            NOW,
            loaded=replace(created, carried=True),
        )
    assert _counts(engine, "w-1") == before


def test_rejection_rows_are_not_written_under_an_existing_saga(engine: Engine) -> None:
    store = SagaStore(engine, REDACTOR)
    assert store.create(_started(), NOW) is not None
    before = _counts(engine, "w-1")
    assert store.record_rejection("w-1", (rejected_start("dup"),), {"a": 1}, NOW) is False
    assert _counts(engine, "w-1") == before


def test_rejections_chain_onto_each_other(engine: Engine) -> None:
    store = SagaStore(engine, REDACTOR)
    for reason in ("one", "two", "three"):
        assert store.record_rejection("w-2", (rejected_start(reason),), {"n": 1}, NOW)
    trail = store.audit_trail("w-2")
    assert [r["error_message"] for r in trail] == ["one", "two", "three"]
    assert [r["saga_state_after"] for r in trail] == ["FAILED"] * 3
    assert trail[0]["context_snapshot"] == {"n": 1}
    assert verify_chain(trail) == []
    assert _counts(engine, "w-2") == (0, 3)
