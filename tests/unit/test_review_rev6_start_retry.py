"""Review of issue 14, item 6: a start's first step message after a database retry."""

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
    """SagaEngine.start decides (and computes the first attempt's start-by = now + grace)
    before `store.retrying` waits out the database, then sends the decision it made before
    the wait. After a failover longer than the grace (30 s by default; the store waits up to
    60 s) the first step message is published with an `expires` in the past: Celery logs
    "expiration date in the past", RabbitMQ gets TTL 0 and the worker discards it, so the
    saga sits idle until start-by + the step timeout (here 300 s) and a recovery. Transitions
    (SagaEngine.handle) re-decide with a fresh clock on each retry; starts do not."""
    clock = FakeClock()
    store = SlowCommitStore(clock)
    dispatcher = RecordingDispatcher()
    engine = SagaEngine(
        store,
        dispatcher,
        Limits(),  # grace 30 s
        clock=clock,
        definitions={DEFINITION.saga_type: DEFINITION}.__getitem__,
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
