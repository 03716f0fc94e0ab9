"""Definition versions against the review of issue 15: a reused label, sagas from before
versions, aborts of parked sagas, and numbers in the fingerprint."""

from __future__ import annotations

from typing import Any

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import (
    AbortRequested,
    MigrateRequested,
    StartRequested,
    StepSucceeded,
)
from saga_worker.core.migration import Shape
from saga_worker.core.model import Direction
from saga_worker.engine import SagaEngine
from saga_worker.errors import UnknownDefinitionVersion
from saga_worker.recovery import sweep
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def shaped(saga_type: str, names: list[str], **kwargs: Any) -> SagaDefinition:
    return SagaDefinition(saga_type, [Step(n, noop, compensate=noop) for n in names], **kwargs)


def engine_with(
    store: InMemoryStore,
    dispatcher: RecordingDispatcher,
    clock: FakeClock,
    versions: list[SagaDefinition],
) -> SagaEngine:
    """An engine whose registry has `versions` (the last is the default), as a worker's."""
    by_version = {d.version: d for d in versions}

    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version is None:
            return versions[-1]
        if version not in by_version:
            raise UnknownDefinitionVersion(saga_type, version, list(by_version))
        return by_version[version]

    return SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )


def engine_with_one(
    store: InMemoryStore, dispatcher: RecordingDispatcher, clock: FakeClock, d: SagaDefinition
) -> SagaEngine:
    """An engine that answers for `d`'s version label with `d`, whatever its steps."""

    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version not in (None, d.version):
            raise UnknownDefinitionVersion(saga_type, str(version), [d.version])
        return d

    return SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )


def test_a_reused_label_with_another_shape_does_not_run_old_sagas_under_it() -> None:
    """A deploy that inserts a step but keeps the label must not move sagas in flight to the
    new steps (a review found step 1 of [reserve, ship] re-sent as `check`): the step
    structure is recorded with the saga and a mismatch is parked like an unknown version."""
    old = shaped("label", ["reserve", "ship"], version="2024-06")
    new = shaped("label", ["reserve", "check", "ship"], version="2024-06")
    assert old.version == new.version and old.fingerprint() != new.fingerprint()
    clock = FakeClock()
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    before = engine_with_one(store, dispatcher, clock, old)
    before.start(StartRequested("s", "label", {}))
    before.handle("s", StepSucceeded(0, Direction.FORWARD, 1, {}))
    clock.advance(3600)  # ship's attempt stalled across the deploy

    after = engine_with_one(store, dispatcher, clock, new)
    result = sweep(store, after, clock(), local={("label", "2024-06")})
    assert result.parked == 1, result  # not run under the other steps: parked, said so
    last = dispatcher.sent[-1]
    step = last.definition.task_name(last.command.step_index, last.command.direction)
    assert step == "saga.label.ship", (
        f"the saga started as [reserve, ship] was re-sent as {step}: same label, other shape"
    )


def test_a_saga_started_before_versions_keeps_its_definition_across_a_later_deploy() -> None:
    """Sagas in flight at the 0.3 -> 0.4 upgrade have definition_version NULL and 'run under
    their type's default'. docs/deploys.md only warns about changing a shape 'in the same
    deploy as the upgrade'; but the default is resolved at every transition, so any later
    deploy that follows case 2 (register the old and the new version, the new one
    default=True) moves them to the new definition: here the recovery sweep re-sends step
    index 1 as the new version's inserted step `check`, although the saga started with
    [reserve, ship] (and `ship`'s message is refused as 'wrong_version' by steps.py).
    `versions --drained order=OLD` cannot see them either (their version is NULL)."""
    v1 = shaped("legacy", ["reserve", "ship"], version="1")
    v2 = shaped("legacy", ["reserve", "check", "ship"], version="2")
    clock = FakeClock()
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    upgrade_deploy = engine_with(store, dispatcher, clock, [v1])
    upgrade_deploy.start(StartRequested("s", "legacy", {}))
    with store._lock:  # as migration 0004 leaves a saga in flight under 0.3
        store._checkpoints["s"]["definition_version"] = None
    # After the upgrade (same shape, as docs/deploys.md asks): reserve completes.
    upgrade_deploy.handle("s", StepSucceeded(0, Direction.FORWARD, 1, {}))
    assert dispatcher.sent[-1].definition.task_name(1, Direction.FORWARD) == "saga.legacy.ship"

    # A later deploy, case 2 of docs/deploys.md: both versions, the new one the default.
    later = engine_with(store, dispatcher, clock, [v1, v2])
    clock.advance(3600)  # ship's attempt stalled (its message was refused: wrong_version)
    result = sweep(store, later, clock(), local={("legacy", "1"), ("legacy", "2")})
    assert result.recovered == 1
    last = dispatcher.sent[-1]
    step = last.definition.task_name(last.command.step_index, last.command.direction)
    assert step == "saga.legacy.ship", (
        f"a saga started under [reserve, ship] was re-sent as {step} of version "
        f"{last.definition.version}: it runs under a definition it did not start with"
    )


def test_a_producers_abort_of_a_parked_saga_survives_its_migration() -> None:
    """docs/deploys.md case 3: the old version's workers are gone, its sagas parked, then
    migrated. A producer's saga.abort reaching a worker without the version is recorded
    there (a review found it was forwarded to a queue nobody consumes, and lost once the
    saga was migrated)."""
    v1 = shaped("order", ["reserve", "ship"], version="1")
    v2 = shaped("order", ["reserve", "ship", "notify"], version="2")
    clock = FakeClock()
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    old = engine_with(store, dispatcher, clock, [v1])
    old.start(StartRequested("s", "order", {}))
    old.handle("s", StepSucceeded(0, Direction.FORWARD, 1, {}))
    clock.advance(3600)  # the old workers stopped; ship's message expired unrun

    new = engine_with(store, dispatcher, clock, [v2])
    parked = sweep(store, new, clock(), local={("order", "2")}, live_since=clock())
    assert parked.parked == 1

    # The producer aborts: the new worker records it without version 1's definition.
    aborted = new.handle("s", AbortRequested("customer cancelled", "shop-frontend"))
    assert aborted.changed and aborted.sent == ()
    row = store.audit_trail("s")[-1]
    assert (row["event_type"], row["user_id"]) == ("abort_requested", "shop-frontend")
    flagged = store.load("s")
    assert flagged is not None and flagged.abort_requested and flagged.parked_at is not None

    # The operator migrates, as docs/deploys.md says.
    outcome = new.migrate("s", v2, Shape.of(v1, "1"), MigrateRequested({}, "ops", "deploy"))
    assert outcome.decision.ignored is None
    saga = store.load("s")
    assert saga is not None
    # The abort must not be lost: the saga should be rolling back (or at least flagged).
    assert saga.abort_requested, saga
    # The resumed attempt reports: rollback begins, under version 2.
    pending = saga.pending
    assert pending is not None
    new.handle("s", StepSucceeded(pending.step_index, pending.direction, pending.number, {}))
    rolled = store.load("s")
    assert rolled is not None and rolled.state.value in ("COMPENSATING", "ABORTED"), rolled


def test_writing_a_timeout_as_an_int_or_a_float_is_the_same_version() -> None:
    """The shape is hashed with json.dumps, so `timeout_seconds=30` and `30.0` (or
    RetryPolicy(initial_delay_seconds=1) and the default 1.0) give different fingerprints:
    a cosmetic edit is a new version, and with the old one no longer registered, every saga
    in flight is parked (docs/deploys.md promises a new version only for a changed policy)."""
    as_int = SagaDefinition("t", [Step("a", noop, timeout_seconds=30)])
    as_float = SagaDefinition("t", [Step("a", noop, timeout_seconds=30.0)])
    assert as_int.version == as_float.version
