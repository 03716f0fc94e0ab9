"""Definition versions (issue 15): fingerprints, the registry, parking and resuming.

DESIGN section 9: a saga runs only under the version it started with; a sweep parks it
while no live worker has that version, and a worker that has it resumes it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from saga_worker import registry
from saga_worker.core.decision import Limits
from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.core.retry import RetryPolicy
from saga_worker.engine import SagaEngine
from saga_worker.errors import DuplicateSagaType, InvalidSagaDefinition, UnknownDefinitionVersion
from saga_worker.recovery import sweep
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def other(call: StepInput) -> dict[str, Any]:
    return {"other": True}


def unique_type() -> str:
    return f"v_{uuid.uuid4().hex[:8]}"


def shaped(saga_type: str, names: list[str], **kwargs: Any) -> SagaDefinition:
    return SagaDefinition(saga_type, [Step(n, noop, compensate=noop) for n in names], **kwargs)


# -- the version of a definition ------------------------------------------------------------


def test_the_fingerprint_follows_the_shape_not_the_code() -> None:
    base = shaped("t", ["a", "b"])
    assert base.version == shaped("t", ["a", "b"]).version
    assert len(base.version) == 12 and int(base.version, 16) >= 0
    # A step's code changed, nothing else: a compatible change, the same version.
    recoded = SagaDefinition(
        "t", [Step("a", other, compensate=noop), Step("b", noop, compensate=noop)]
    )
    assert recoded.version == base.version
    changes = [
        shaped("t", ["a", "x", "b"]),  # a step inserted
        shaped("t", ["a", "c"]),  # renamed
        shaped("t", ["b", "a"]),  # reordered
        SagaDefinition("t", [Step("a", noop), Step("b", noop, compensate=noop)]),  # kind
        SagaDefinition("t", [Step("a", Remote("r.a", "q")), Step("b", noop, compensate=noop)]),
        SagaDefinition(
            "t",
            [
                Step("a", noop, compensate=noop, retry=RetryPolicy(max_attempts=9)),
                Step("b", noop, compensate=noop),
            ],
        ),
        SagaDefinition(
            "t",
            [Step("a", noop, compensate=noop, timeout_seconds=7), Step("b", noop, compensate=noop)],
        ),
        shaped("t", ["a", "b"], default_timeout_seconds=9),
    ]
    versions = {d.version for d in changes}
    assert len(versions) == len(changes) and base.version not in versions
    # Remote task names and queues are part of the shape.
    one = SagaDefinition("t", [Step("a", Remote("r.a", "q1"))])
    assert one.version != SagaDefinition("t", [Step("a", Remote("r.a", "q2"))]).version


def test_an_explicit_label_is_the_version_and_must_fit_a_queue_name() -> None:
    assert shaped("t", ["a"], version="2024-06.b").version == "2024-06.b"
    for bad in ("", "has space", "-lead", "x" * 65, "a/b", "é"):
        with pytest.raises(InvalidSagaDefinition, match="version"):
            shaped("t", ["a"], version=bad)


# -- several versions in one registry ------------------------------------------------------


def test_new_starts_use_the_newest_or_the_default_version() -> None:
    saga_type = unique_type()
    v1 = registry.register(shaped(saga_type, ["a"], version="1"))
    v2 = registry.register(shaped(saga_type, ["a", "b"], version="2"))
    assert registry.get(saga_type) is v2
    assert registry.versions_of(saga_type) == [v1, v2]
    assert registry.get_version(saga_type, "1") is v1
    assert registry.get_version(saga_type, None) is v2  # a saga started before versions
    marked = unique_type()
    old = registry.register(shaped(marked, ["a"], version="1", default=True))
    registry.register(shaped(marked, ["a", "b"], version="2"))
    assert registry.get(marked) is old
    with pytest.raises(DuplicateSagaType, match="default"):
        registry.register(shaped(marked, ["c"], version="3", default=True))


def test_one_version_cannot_name_two_definitions() -> None:
    saga_type = unique_type()
    first = registry.register(shaped(saga_type, ["a"]))
    assert registry.register(first) is first  # the same object again: a no-op
    # Same shape, other code: the same fingerprint, so not a new version.
    twin = SagaDefinition(saga_type, [Step("a", other, compensate=noop)])
    with pytest.raises(DuplicateSagaType, match="version= label"):
        registry.register(twin)


def test_an_unknown_version_says_what_is_registered_and_what_to_do() -> None:
    saga_type = unique_type()
    registry.register(shaped(saga_type, ["a"], version="1"))
    with pytest.raises(UnknownDefinitionVersion) as info:
        registry.get_version(saga_type, "0")
    assert "'0'" in str(info.value) and "registered: 1" in str(info.value)
    assert "saga-worker migrate" in str(info.value)


# -- a saga records its version; the sweep parks and resumes --------------------------------


def engine_for(definitions: dict[tuple[str, str], SagaDefinition], clock: FakeClock) -> Any:
    store = InMemoryStore()
    dispatcher = RecordingDispatcher()

    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version is None:
            return list(definitions.values())[-1]
        try:
            return definitions[(saga_type, version)]
        except KeyError:
            raise UnknownDefinitionVersion(saga_type, version, []) from None

    engine = SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )
    return store, dispatcher, engine


def test_a_saga_records_its_version_and_outline_at_start() -> None:
    v1 = shaped("rec", ["a", "b"], version="1")
    store, _, engine = engine_for({("rec", "1"): v1}, FakeClock())
    engine.start(StartRequested("s", "rec", {}))
    saga = store.load("s")
    assert saga is not None and saga.definition_version == "1" and saga.parked_at is None
    start = store.audit_trail("s")[0]
    assert start["event_data"]["definition_version"] == "1"
    assert start["event_data"]["steps"] == [["a", True], ["b", True]]


def test_a_stalled_saga_whose_version_no_live_worker_has_is_parked_once_then_resumed() -> None:
    v1 = shaped("park", ["a", "b"], version="1")
    clock = FakeClock()
    store, dispatcher, engine = engine_for({("park", "1"): v1}, clock)
    engine.start(StartRequested("s", "park", {}))
    engine.handle("s", StepSucceeded(0, Direction.FORWARD, 1, {}))
    sent = len(dispatcher.sent)
    clock.advance(3600)  # step b's message expired unrun: nobody consumes version 1's queue

    # A worker without version 1, and no live worker with it: parked, not re-sent.
    elsewhere = sweep(store, engine, clock(), local={("park", "2")}, live_since=clock())
    assert (elsewhere.parked, elsewhere.recovered) == (1, 0)
    saga = store.load("s")
    assert saga is not None and saga.parked_at == clock() and saga.pending is not None
    assert len(dispatcher.sent) == sent
    # Parked sagas leave the stalled scan: the next sweeps neither park nor count it again.
    clock.advance(60)
    again = sweep(store, engine, clock(), local={("park", "2")}, live_since=clock())
    assert (again.examined, again.parked) == (0, 0)
    events = [r["event_type"] for r in store.audit_trail("s")]
    assert events.count("saga_parked") == 1
    parked_row = store.audit_trail("s")[-1]
    assert parked_row["user_id"] == "system:recovery"
    assert parked_row["event_data"]["definition_version"] == "1"

    # A worker that has version 1 sweeps: the kept attempt is sent again, not counted.
    here = sweep(store, engine, clock(), local={("park", "1")})
    assert here.resumed == 1
    saga = store.load("s")
    assert saga is not None and saga.parked_at is None and saga.pending is not None
    assert (saga.pending.step_index, saga.pending.number, saga.pending.recoveries) == (1, 1, 0)
    assert len(dispatcher.sent) == sent + 1
    resumed = store.audit_trail("s")[-2]
    assert resumed["event_type"] == "saga_recovered"
    assert resumed["event_data"]["reason"] == "unparked"


def test_a_stalled_saga_of_another_live_workers_version_is_left_to_it() -> None:
    v1 = shaped("left", ["a"], version="1")
    clock = FakeClock()
    store, _dispatcher, engine = engine_for({("left", "1"): v1}, clock)
    engine.start(StartRequested("s", "left", {}))
    clock.advance(3600)
    store.workers = {("left", "1")}  # a live worker has version 1; this one does not
    result = sweep(store, engine, clock(), local={("left", "2")}, live_since=clock())
    assert (result.skipped, result.parked, result.recovered) == (1, 0, 0)
    saga = store.load("s")
    assert saga is not None and saga.parked_at is None
    assert [r["event_type"] for r in store.audit_trail("s")] == ["saga_start", "step_start"]


def test_a_saga_started_before_versions_is_recovered_under_the_default() -> None:
    v1 = shaped("legacy", ["a"], version="1")
    clock = FakeClock()
    store, _dispatcher, engine = engine_for({("legacy", "1"): v1}, clock)
    engine.start(StartRequested("s", "legacy", {}))
    with store._lock:  # as migration 0004 leaves a saga that was in flight
        store._checkpoints["s"]["definition_version"] = None
    clock.advance(timedelta(hours=1).total_seconds())
    result = sweep(store, engine, clock(), local=set())
    assert result.recovered == 1
