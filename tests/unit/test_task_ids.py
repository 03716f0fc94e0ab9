"""The Celery task id of each attempt (issue 17): computed by the core, recorded in the
attempt's `step_start` / `compensation_start` row, and the id the dispatcher sends with."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from saga_worker.config import Settings
from saga_worker.core.commands import TASK_ID_NAMESPACE, RunAttempt, attempt_task_id
from saga_worker.core.decision import Decision, Limits
from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.events import (
    AttemptDue,
    AttemptExpired,
    AttemptStalled,
    Event,
    ParkRequested,
    RetryRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
    UnparkRequested,
)
from saga_worker.core.model import Direction, Saga
from saga_worker.core.parking import park
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.stages import WaitFor
from saga_worker.core.transition import start, transition
from saga_worker.testing import SagaTestHarness
from saga_worker.worker.dispatch import CeleryDispatcher
from tests.unit.fake_celery import FakeApp

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
FWD, COMP = Direction.FORWARD, Direction.COMPENSATE
KEY = "k" * 64


def noop(call: StepInput) -> dict[str, Any]:
    return {}


RETRY = RetryPolicy(max_attempts=3, initial_delay_seconds=1, jitter=0)
DEFINITION = SagaDefinition(
    "ids",
    [
        Step("reserve", noop, compensate=noop, retry=RETRY, timeout_seconds=10),
        Step("charge", noop, compensate=noop, retry=RETRY, timeout_seconds=10),
    ],
)
LIMITS = Limits(stall_grace_seconds=5, max_recoveries=5)


class Walk:
    """Feeds events through the pure core and keeps every decision."""

    def __init__(self, definition: SagaDefinition = DEFINITION) -> None:
        self.definition = definition
        self.now = T0
        first = start(definition, StartRequested("s-1", definition.saga_type, {}), T0, LIMITS)
        self.saga: Saga = first.saga
        self.decisions: list[Decision] = [first]

    def apply(self, event: Event, advance: float = 1.0) -> Decision:
        self.now += timedelta(seconds=advance)
        decision = transition(self.definition, self.saga, event, self.now, LIMITS)
        assert decision.ignored is None, decision.ignored
        self.saga = decision.saga
        self.decisions.append(decision)
        return decision

    def starts(self) -> list[tuple[int, str, int, str]]:
        """(step_index, direction, attempt, task_id) of every start row, in order."""
        return [
            (e.step_index, e.event_type, e.event_data["attempt"], e.event_data["task_id"])
            for d in self.decisions
            for e in d.audit
            if e.event_type in ("step_start", "compensation_start") and e.step_index is not None
        ]

    def commands(self) -> list[RunAttempt]:
        return [c for d in self.decisions for c in d.commands]


def test_the_id_is_a_uuid5_of_saga_step_direction_attempt_and_recoveries() -> None:
    expected = uuid.uuid5(TASK_ID_NAMESPACE, "s-1:1:compensate:3:2")
    assert attempt_task_id("s-1", 1, COMP, 3, 2) == str(expected)
    assert uuid.UUID(attempt_task_id("s-1", 1, COMP, 3, 2)).version == 5


def test_each_start_row_records_the_id_its_command_is_sent_with() -> None:
    walk = Walk()
    walk.apply(StepFailed(0, FWD, 1, "Boom", "boom"))  # a retry: attempt 2
    walk.apply(AttemptStalled(0, FWD, 2, recoveries=0), advance=60)  # re-sent
    walk.apply(StepSucceeded(0, FWD, 2, {}))
    walk.apply(StepFailed(1, FWD, 1, "Boom", "no", retryable=False))  # rollback
    rows = walk.starts()
    commands = walk.commands()
    assert [r[3] for r in rows] == [c.task_id for c in commands]
    assert [(c.step_index, c.direction, c.attempt) for c in commands] == [
        (0, FWD, 1),
        (0, FWD, 2),
        (0, FWD, 2),
        (1, FWD, 1),
        (0, COMP, 1),
    ]
    assert [c.task_id for c in commands] == [
        attempt_task_id("s-1", 0, FWD, 1, 0),
        attempt_task_id("s-1", 0, FWD, 2, 0),
        attempt_task_id("s-1", 0, FWD, 2, 1),
        attempt_task_id("s-1", 1, FWD, 1, 0),
        attempt_task_id("s-1", 0, COMP, 1, 0),
    ]
    assert len({c.task_id for c in commands}) == len(commands)  # one id per send


def test_the_same_transitions_give_the_same_ids() -> None:
    """Pure: replaying the events (a checkpoint conflict retried, a golden replay) gives the
    ids the first decision recorded."""

    def ids() -> list[str]:
        walk = Walk()
        walk.apply(StepFailed(0, FWD, 1, "Boom", "boom"))
        walk.apply(AttemptStalled(0, FWD, 2, recoveries=0), advance=60)
        return [c.task_id for c in walk.commands()]

    assert ids() == ids()


def test_a_redelivered_or_duplicate_result_sends_nothing_so_no_new_id() -> None:
    walk = Walk()
    walk.apply(StepSucceeded(0, FWD, 1, {}))
    late = transition(DEFINITION, walk.saga, StepSucceeded(0, FWD, 1, {}), walk.now, LIMITS)
    assert late.ignored is not None and late.commands == ()


def test_every_resend_of_an_attempt_has_its_own_id() -> None:
    """A worker that discarded an expired copy keeps its id as revoked (Celery's
    Request.maybe_expire), so a new copy must never reuse it: stalls, expiries, an
    operator's forced retry and the re-send of a parked saga each get another id."""
    walk = Walk()
    walk.apply(AttemptStalled(0, FWD, 1, recoveries=0), advance=60)
    pending = walk.saga.pending
    assert pending is not None
    walk.apply(AttemptExpired(0, FWD, 1, pending.start_by), advance=pending.allowance + 1)
    walk.apply(RetryRequested(user_id="op", force=True))
    pending = walk.saga.pending
    assert pending is not None and pending.recoveries == 3
    walk.now += timedelta(days=1)
    parked = park(
        walk.saga, ParkRequested(0, FWD, 1, pending.recoveries, "no worker"), walk.now
    ).saga
    assert parked.parked_at is not None
    walk.saga = parked
    walk.apply(UnparkRequested("system:recovery"))
    assert walk.saga.pending is not None and walk.saga.pending.recoveries == 3  # not counted
    ids = [c.task_id for c in walk.commands()]
    assert len(ids) == 5 and len(set(ids)) == 5, ids
    assert ids[-1] == attempt_task_id("s-1", 0, FWD, 1, 3, unparked=parked.parked_at)


def test_a_held_retry_gets_its_id_when_it_is_sent() -> None:
    slow = SagaDefinition(
        "held",
        [
            Step(
                "only",
                noop,
                retry=RetryPolicy(
                    max_attempts=2, initial_delay_seconds=3600, max_delay_seconds=3600, jitter=0
                ),
            )
        ],
    )
    walk = Walk(slow)
    held = walk.apply(StepFailed(0, FWD, 1, "Boom", "boom"))
    assert held.commands == ()  # waits in the database, not in the broker
    assert [e.event_type for e in held.audit] == ["step_retry"]
    sent = walk.apply(AttemptDue(0, FWD, 2), advance=3600)
    (command,) = sent.commands
    assert command.task_id == attempt_task_id("s-1", 0, FWD, 2, 0)
    assert sent.audit[-1].event_data["task_id"] == command.task_id


def test_a_wait_sends_nothing_and_records_no_task_id() -> None:
    waits = SagaDefinition("waits", [WaitFor("go", signal="go", timeout_seconds=60)])
    decision = start(waits, StartRequested("w-1", "waits", {}), T0)
    (row,) = [e for e in decision.audit if e.event_type == "step_start"]
    assert decision.commands == () and "task_id" not in row.event_data


def test_the_dispatcher_sends_local_and_remote_steps_with_the_commands_task_id(
    tmp_path: Path,
) -> None:
    definition = SagaDefinition(
        "disp",
        [Step("local", noop, compensate=Remote("svc.undo", "svc")), Step("remote", noop)],
    )
    decision = start(definition, StartRequested("d-1", "disp", {}), T0)
    (command,) = decision.commands
    settings = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    app = FakeApp()
    dispatcher = CeleryDispatcher(app, settings, KEY)
    dispatcher.send(definition, decision.saga, command)
    undo = RunAttempt("d-1", 0, COMP, 1, T0, T0, task_id=attempt_task_id("d-1", 0, COMP, 1, 0))
    dispatcher.send(definition, decision.saga, undo)
    (local_name, local), (remote_name, remote) = app.sent
    assert (local_name, local["task_id"]) == ("saga.disp.local", command.task_id)
    assert (remote_name, remote["task_id"]) == ("svc.undo", undo.task_id)
    # The replies the remote service's Celery sends back get ids of their own.
    assert "task_id" not in remote["link"] and "task_id" not in remote["link_error"]


def test_the_harness_shows_the_id_of_each_attempt_it_sent() -> None:
    harness = SagaTestHarness(DEFINITION)
    harness.start({})
    harness.run_until_settled()
    starts = [r for r in harness.audit_trail() if r["event_type"] == "step_start"]
    assert [r["event_data"]["task_id"] for r in starts] == [s.task_id for s in harness.sent]
    assert harness.sent[0].task_id == attempt_task_id(harness.saga.saga_id, 0, FWD, 1, 0)
