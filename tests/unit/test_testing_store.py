"""saga_worker.testing's InMemoryStore and RecordingDispatcher behave as the SQL store does."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from saga_worker import registry
from saga_worker.audit.chain import GENESIS_HASH
from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import MISSING_TAIL, MODIFIED
from saga_worker.config import DEFAULT_REDACT_KEYS
from saga_worker.core.decision import AuditEvent, Decision, Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import (
    AbortRequested,
    AttemptStalled,
    Event,
    StartRequested,
    StepFailed,
    StepSucceeded,
)
from saga_worker.core.model import Direction, Saga, SagaState
from saga_worker.core.transition import start, transition
from saga_worker.engine import SagaEngine
from saga_worker.errors import ConcurrencyConflict
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher, SendFailed

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
FWD, COMP = Direction.FORWARD, Direction.COMPENSATE
NOOP: Any = lambda call: {}  # noqa: E731  (the store never runs steps)
DEF = SagaDefinition(
    "store_parity",
    [Step(name, NOOP, compensate=NOOP, timeout_seconds=10) for name in ("a", "b", "c")],
)
LIMITS = Limits(stall_grace_seconds=5, max_recoveries=2, max_broker_delay_seconds=3600)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def decider(event: Event, now: datetime) -> Callable[[Saga], Decision]:
    return lambda saga: transition(DEF, saga, event, now, LIMITS)


def started(saga_id: str, context: dict[str, Any] | None = None) -> Decision:
    request = StartRequested(saga_id, DEF.saga_type, context or {"amount": 5}, user_id="u1")
    return start(DEF, request, T0, LIMITS)


def drive(store: Any) -> None:
    """The same writes, in the same order, against any store."""
    assert store.create(started("s1", {"amount": 5, "password": "hunter2"}), T0) is not None
    steps: list[tuple[float, Event]] = [
        (1, StepSucceeded(0, FWD, 1, {"card_number": "4111 1111 1111 1111", "n": 1})),
        (2, StepFailed(1, FWD, 1, "Boom", "password=hunter2 went wrong", retryable=True)),
        (3, StepSucceeded(1, FWD, 1, {})),  # late duplicate: ignored, nothing written
        (9, StepFailed(1, FWD, 2, "Boom", "again", retryable=False)),
        (10, StepSucceeded(0, COMP, 1, {"undone": True})),
    ]
    for seconds, event in steps:
        store.apply("s1", decider(event, at(seconds)), at(seconds))
    rejection = AuditEvent("saga_rejected", None, SagaState.FAILED, error_message="bad context")
    assert store.record_rejection("s2", (rejection,), {"x": 1}, at(11)) is True
    assert store.record_rejection("s1", (rejection,), {}, at(11)) is False
    # A later valid start under a rejected saga_id goes on from the rejection's chain.
    assert store.create(started("s2"), at(12)) is not None
    assert store.create(started("s2"), at(13)) is None
    assert store.create(started("s3"), at(12)) is not None


def test_same_writes_give_the_same_rows_and_checkpoints_as_the_sql_store(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'parity.sqlite3'}")
    upgrade(engine)
    redactor = Redactor(DEFAULT_REDACT_KEYS)
    sql, memory = SagaStore(engine, redactor), InMemoryStore(redactor)
    drive(sql)
    drive(memory)
    for saga_id in ("s1", "s2", "s3"):
        assert memory.load(saga_id) == sql.load(saga_id)
        assert memory.load_for_step(saga_id) == sql.load_for_step(saga_id)
        # Every column of every row, hashes included: the chains are byte-for-byte the same.
        assert memory.audit_trail(saga_id) == sql.audit_trail(saga_id)
        assert memory.saga_chain(saga_id) == sql.saga_chain(saga_id)
    assert [r["event_type"] for r in memory.audit_trail("s1")] == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    assert memory.audit_trail("s1")[0]["context_snapshot"]["password"] == "***REDACTED***"
    for now in (at(0), at(30), at(10_000)):
        assert memory.stalled(now, 10) == sql.stalled(now, 10)
    assert memory.verify_audit() == []
    engine.dispose()


def test_apply_checks_the_version_and_skips_writes_of_ignored_decisions() -> None:
    store = InMemoryStore()
    assert store.apply("nope", decider(AbortRequested("x"), T0), T0) is None
    first = store.create(started("s1"), T0)
    assert first is not None and first.saga.version == 1
    ignored = store.apply("s1", decider(StepSucceeded(2, FWD, 1, {}), at(1)), at(1))
    assert ignored is not None and ignored.committed is None and ignored.decision.ignored
    applied = store.apply("s1", decider(StepSucceeded(0, FWD, 1, {"k": [1]}), at(1)), at(1))
    assert applied is not None and applied.committed is not None
    assert applied.committed.saga.version == 2 == store.load("s1").version  # type: ignore[union-attr]
    assert applied.committed.audit_head == store.audit_trail("s1")[-1]["hash"]
    # A checkpoint read before another writer committed: the write is refused.
    with pytest.raises(ConcurrencyConflict):
        store.apply("s1", decider(AbortRequested("late"), at(2)), at(2), loaded=first)
    assert store.load("s1").version == 2  # type: ignore[union-attr]
    assert len(store.audit_trail("s1")) == 4


def test_loads_are_copies_as_from_a_json_column() -> None:
    store = InMemoryStore()
    store.create(started("s1", {"nested": {"xs": (1, 2)}}), T0)
    saga = store.load("s1")
    assert saga is not None and saga.context == {"nested": {"xs": [1, 2]}}
    saga.context["nested"]["xs"].append(3)
    store.audit_trail("s1")[0]["event_data"]["saga_type"] = "changed"
    assert store.load("s1").context == {"nested": {"xs": [1, 2]}}  # type: ignore[union-attr]
    assert store.verify_audit() == []


def test_stalled_is_ordered_by_deadline_then_saga_id_and_pages() -> None:
    store = InMemoryStore()
    # Same start time and timeout: equal deadlines, ordered by saga_id.
    for saga_id in ("b", "a", "c"):
        store.create(started(saga_id), T0)
    early = start(DEF, StartRequested("early", DEF.saga_type, {}), at(-5), LIMITS)
    store.create(early, at(-5))
    deadline = at(15)  # started at T0, timeout 10 + grace 5
    # Strictly before `now`: a deadline equal to it is not stalled yet.
    assert [(row[0], row[2]) for row in store.stalled(deadline, 10)] == [("early", at(10))]
    later = at(16)
    ids = [row[0] for row in store.stalled(later, 10)]
    assert ids == ["early", "a", "b", "c"]
    page = store.stalled(later, 2)
    assert [row[0] for row in page] == ["early", "a"]
    rest = store.stalled(later, 2, after=(page[-1][2], page[-1][0]))
    assert [row[0] for row in rest] == ["b", "c"]
    assert rest[0][1] == {
        "attempt_seq": 1,  # the saga's highest attempt number, kept beside its pending attempt
        "step_index": 0,
        "direction": "forward",
        "number": 1,
        "not_before": T0.isoformat(),
        "deadline": deadline.isoformat(),
        # recoveries, held, first and uncertain are at their defaults: left out.
        "allowance": 5.0,
    }


def test_verify_audit_finds_a_modified_row_and_a_deleted_last_row() -> None:
    store = InMemoryStore()
    store.create(started("s1"), T0)
    store.apply("s1", decider(StepSucceeded(0, FWD, 1, {}), at(1)), at(1))
    assert store.verify_audit() == []
    store._audit[1]["event_data"]["attempt"] = 7
    assert [p.kind for p in store.verify_audit()] == [MODIFIED]
    store._audit[1]["event_data"]["attempt"] = 1
    store._audit.pop()
    assert [p.kind for p in store.verify_audit()] == [MISSING_TAIL]


def test_a_rejection_alone_is_a_chain_from_genesis_without_a_checkpoint() -> None:
    store = InMemoryStore()
    rejection = AuditEvent("saga_rejected", None, SagaState.FAILED, error_message="no")
    assert store.record_rejection("r1", (rejection,), {}, T0)
    rows, head = store.saga_chain("r1")
    assert head is None and rows[0]["prev_hash"] == GENESIS_HASH and rows[0]["id"] == 1
    assert store.verify_audit() == []  # a rejection is not an orphan


def test_concurrent_recoveries_of_one_stalled_attempt_commit_once() -> None:
    """Threads racing through the real engine: version conflicts reload, one recovery wins."""
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    clock = FakeClock(at(100))
    registry.register(DEF)
    engine = SagaEngine(store, dispatcher, LIMITS, clock=clock)
    store.create(started("s1"), T0)
    barrier = threading.Barrier(8)
    ignored: list[str | None] = []

    def recover() -> None:
        barrier.wait()
        ignored.append(engine.handle("s1", AttemptStalled(0, FWD, 1, 0)).ignored)

    threads = [threading.Thread(target=recover) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ignored.count(None) == 1
    assert [r["event_type"] for r in store.audit_trail("s1")].count("saga_recovered") == 1
    assert store.load("s1").pending.recoveries == 1  # type: ignore[union-attr]
    assert len(dispatcher.sent) == 1
    assert store.verify_audit() == []


def test_recording_dispatcher_records_the_committed_saga_and_can_fail_sends() -> None:
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    decision = started("s1")
    committed = store.create(decision, T0)
    assert committed is not None
    dispatcher.send(DEF, decision.saga, decision.commands[0], committed)
    sent = dispatcher.sent[0]
    assert sent.saga.version == 1 and sent.command == decision.commands[0]
    assert (sent.step_name, sent.task_name, sent.remote) == ("a", "saga.store_parity.a", False)
    assert sent.key == (0, FWD, 1)
    dispatcher.fail_next(2)
    for _ in range(2):
        with pytest.raises(SendFailed):
            dispatcher.send(DEF, decision.saga, decision.commands[0], None)
    dispatcher.send(DEF, decision.saga, decision.commands[0], None)
    assert len(dispatcher.failed) == 2 and len(dispatcher.sent) == 2
    assert dispatcher.failed[0].saga.version == 0  # no checkpoint given: the decided saga


def test_fake_clock_moves_forward_only() -> None:
    clock = FakeClock(T0)
    assert clock() == T0
    assert clock.advance(1.5) == at(1.5)
    assert clock.advance_to(T0) == at(1.5)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        FakeClock(datetime(2026, 1, 1))
