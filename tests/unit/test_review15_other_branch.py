"""Adversarial review of issue 15 (definition versions): failing tests for what it found.

The findings fixed on another branch (aborts of parked sagas, sagas without a recorded
version, number normalisation in the shape), moved here unchanged from test_review15.py.

Each test states what should hold; the docstring says what goes wrong today.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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
from saga_worker.worker.dispatch import version_queue

ROOT = Path(__file__).resolve().parents[2]


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


# -- 1. an abort forwarded to a version queue nobody consumes is lost on migration ----------


def test_a_producers_abort_of_a_parked_saga_survives_its_migration() -> None:
    """docs/deploys.md case 3: the old version's workers are gone, its sagas parked, then
    migrated. A producer's saga.abort for such a saga reaches a new worker, which lacks the
    version: engine.handle raises UnknownDefinitionVersion and worker/tasks.py `_forward`s
    the message to `saga.<type>.<old>`, a queue nobody consumes. Nothing is recorded in the
    database, so after `saga-worker migrate` the saga runs on under the new version and
    completes: the abort is silently lost (it would only be seen if an old worker ever
    started again)."""
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

    # The producer aborts: the new worker cannot decide it and forwards it (tasks.py).
    with pytest.raises(UnknownDefinitionVersion) as info:
        new.handle("s", AbortRequested("customer cancelled", "shop-frontend"))
    forwarded_to = version_queue("saga", info.value.saga_type, info.value.version)
    assert forwarded_to == "saga.order.1"  # consumed only by workers with version 1: none

    # The operator migrates, as docs/deploys.md says.
    outcome = new.migrate("s", v2, Shape.of(v1, "1"), MigrateRequested({}, "ops", "deploy"))
    assert outcome.decision.ignored is None
    saga = store.load("s")
    assert saga is not None
    # The abort must not be lost: the saga should be rolling back (or at least flagged).
    assert saga.abort_requested or saga.state.value in ("COMPENSATING", "ABORTED"), (
        "the producer's abort was forwarded to saga.order.1 and is lost: the migrated saga "
        f"runs on ({saga.state.value}, abort_requested={saga.abort_requested})"
    )


# -- 2. a saga started before versions runs under whatever default is deployed later ---------


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


# -- 5. the fingerprint depends on how a number is written ------------------------------------


def test_writing_a_timeout_as_an_int_or_a_float_is_the_same_version() -> None:
    """The shape is hashed with json.dumps, so `timeout_seconds=30` and `30.0` (or
    RetryPolicy(initial_delay_seconds=1) and the default 1.0) give different fingerprints:
    a cosmetic edit is a new version, and with the old one no longer registered, every saga
    in flight is parked (docs/deploys.md promises a new version only for a changed policy)."""
    as_int = SagaDefinition("t", [Step("a", noop, timeout_seconds=30)])
    as_float = SagaDefinition("t", [Step("a", noop, timeout_seconds=30.0)])
    assert as_int.version == as_float.version
