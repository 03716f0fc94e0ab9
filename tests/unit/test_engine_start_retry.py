"""SagaEngine.start decides inside the store's retry: a database outage cannot expire the first
step message before it is sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import StartRequested
from saga_worker.engine import SagaEngine
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher

T = TypeVar("T")

#: SagaStore.retrying waits out a database restart or failover for up to 60 s
#: (store/repository.py, retry_seconds), twice the default queue allowance.
OUTAGE_SECONDS = 40.0

DEFINITION = SagaDefinition(
    "review_start_retry", [Step("only", lambda call: {}, timeout_seconds=300)]
)


class SlowCommitStore(InMemoryStore):
    """The SQL store's `retrying` during a 40 s database failover: the operation succeeds once
    the database is back, OUTAGE_SECONDS later."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        self.clock.advance(OUTAGE_SECONDS)
        return operation()


def test_the_first_step_message_of_a_start_is_not_sent_already_expired() -> None:
    """SagaEngine.start computes the first attempt's start-by (now + grace) inside
    `store.retrying`, with the clock read on each try as transitions do: after a failover
    longer than the grace (30 s by default; the SQL store waits up to 60 s) the first step
    message still has its full queue allowance. Deciding before the wait would publish it
    with an `expires` in the past: the worker discards it and the saga sits idle until
    start-by + the step timeout (here 300 s) and a recovery."""
    clock = FakeClock()
    store = SlowCommitStore(clock)
    dispatcher = RecordingDispatcher()
    engine = SagaEngine(
        store,
        dispatcher,
        Limits(),  # grace 30 s
        clock=clock,
        definitions=lambda saga_type, _version: DEFINITION,
    )
    result = engine.start(StartRequested("s-1", DEFINITION.saga_type, {}))
    assert result.created
    (sent,) = dispatcher.sent
    start_by: Any = sent.command.start_by
    assert start_by is not None
    assert start_by > clock(), (
        f"the first step message was sent {(clock() - start_by).total_seconds():.0f}s after "
        "its start-by: it expires unrun and the saga waits for deadline + recovery"
    )
