"""Review of issue 15: an explicit version label is trusted as the shape."""

from __future__ import annotations

from typing import Any

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested, StepSucceeded
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
    store: InMemoryStore, dispatcher: RecordingDispatcher, clock: FakeClock, d: SagaDefinition
) -> SagaEngine:
    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version not in (None, d.version):
            raise UnknownDefinitionVersion(saga_type, str(version), [d.version])
        return d

    return SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )


def test_a_reused_label_with_another_shape_does_not_run_old_sagas_under_it() -> None:
    """With `version="2024-06"` the label *is* the version: nothing compares the shape a saga
    started with (its saga_start row even records the outline) with the shape now registered
    under that label. A deploy that inserts a step but keeps the label (easy to do: the
    label is a date or a release name) silently moves every saga in flight to the new shape:
    here step index 1 of a saga started as [reserve, ship] is re-sent as `check`, the very
    wrong-step run issue 15 exists to prevent. The fingerprint of the shape should be
    recorded with the label and a mismatch refused (parked) like an unknown version."""
    old = shaped("label", ["reserve", "ship"], version="2024-06")
    new = shaped("label", ["reserve", "check", "ship"], version="2024-06")
    assert old.version == new.version and old.fingerprint() != new.fingerprint()
    clock = FakeClock()
    store, dispatcher = InMemoryStore(), RecordingDispatcher()
    before = engine_with(store, dispatcher, clock, old)
    before.start(StartRequested("s", "label", {}))
    before.handle("s", StepSucceeded(0, Direction.FORWARD, 1, {}))
    clock.advance(3600)  # ship's attempt stalled across the deploy

    after = engine_with(store, dispatcher, clock, new)
    sweep(store, after, clock(), local={("label", "2024-06")})
    last = dispatcher.sent[-1]
    step = last.definition.task_name(last.command.step_index, last.command.direction)
    assert step == "saga.label.ship", (
        f"the saga started as [reserve, ship] was re-sent as {step}: same label, other shape"
    )
