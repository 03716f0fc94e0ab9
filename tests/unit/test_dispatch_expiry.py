"""Step messages carry their start-by time as Celery's `expires`; the sweep's does not expire
by anyone's clock (issue 14, item 6)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from saga_worker.config import Settings
from saga_worker.core.commands import RunAttempt
from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested
from saga_worker.core.model import Direction
from saga_worker.core.transition import start
from saga_worker.errors import ConfigurationError
from saga_worker.worker.app import RECOVERY_ENTRY, SweepGate, create_app
from saga_worker.worker.dispatch import CeleryDispatcher
from tests.unit.fake_celery import FakeApp

NOOP: Any = lambda call: {}  # noqa: E731
KEY = "k" * 32


def _settings(tmp_path: Path) -> Settings:
    return Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": "redis://127.0.0.1:1/0"}
    )


def test_local_and_remote_step_messages_expire_at_their_start_by(tmp_path: Path) -> None:
    definition = SagaDefinition(
        "exp",
        [
            Step("local", NOOP, timeout_seconds=10),
            Step("remote", Remote("svc.remote", "svc"), timeout_seconds=10),
        ],
    )
    now = datetime.now(UTC)
    decision = start(definition, StartRequested("s-1", "exp", {}), now)
    (command,) = decision.commands
    assert command.start_by is not None and command.start_by > now
    app = FakeApp()
    dispatcher = CeleryDispatcher(app, _settings(tmp_path), KEY)
    dispatcher.send(definition, decision.saga, command)
    remote = type(command)(
        "s-1",
        1,
        command.direction,
        1,
        command.not_before,
        command.start_by + timedelta(1),
        task_id="remote-task-id",
    )
    dispatcher.send(definition, decision.saga, remote)
    (local_name, local), (remote_name, remote_options) = app.sent
    assert local_name == "saga.exp.local" and local["expires"] == command.start_by
    assert remote_name == "svc.remote" and remote_options["expires"] == remote.start_by


def test_the_recovery_sweep_message_has_no_wall_clock_expiry(tmp_path: Path) -> None:
    """An absolute `expires` set by the beat's clock drops every sweep on a worker whose
    clock runs ahead by more than it, and every sweep queued behind a longer backlog."""
    app = create_app(_settings(tmp_path))
    entry = app.conf.beat_schedule[RECOVERY_ENTRY]
    assert "expires" not in entry.get("options", {})


def test_sweeps_that_pile_up_are_coalesced_on_the_monotonic_clock() -> None:
    now = [100.0]
    gate = SweepGate(5.0, clock=lambda: now[0])
    assert gate.open()
    now[0] += 1.0  # the next queued sweep right after: same overdue attempts, skipped
    assert not gate.open()
    now[0] += 4.0
    assert gate.open()


def test_a_long_sweep_does_not_make_the_next_due_sweep_coalesce() -> None:
    """The gate measures from the previous sweep's start: with a 10 s interval, a sweep that
    scanned at t=0 and took 6 s (a page of re-sends under a backlog) must not swallow the
    beat's sweep of t=10, which would see what became overdue since the scan of t=0."""
    interval = 10.0
    now = [0.0]
    gate = SweepGate(interval / 2, clock=lambda: now[0])
    assert gate.open()  # the sweep of t=0 scans, and runs until t=6
    now[0] = interval  # the beat's next tick, one full interval after the last scan
    assert gate.open(), "a sweep one interval after the previous scan was coalesced away"
    now[0] = interval + 1.0  # one queued behind it: merged with the scan of t=10
    assert not gate.open()


def test_a_second_beat_is_for_availability_not_more_sweeps() -> None:
    """docs/recovery.md: a worker process runs at most one sweep per half interval, so two
    beats 3 s apart (interval 10 s) give the sweeps of one beat; when one beat stops, the
    other's keep recovery going at one sweep per interval."""
    interval = 10.0
    now = [0.0]
    gate = SweepGate(interval / 2, clock=lambda: now[0])
    beat_a = [t * interval for t in range(3)]  # stops after t=20
    beat_b = [t * interval + 3.0 for t in range(6)]
    ran: list[float] = []
    for tick in sorted(beat_a + beat_b):
        now[0] = tick
        if gate.open():
            ran.append(tick)
    assert ran == [0.0, 10.0, 20.0, 33.0, 43.0, 53.0]
    assert all(later - earlier >= interval / 2 for earlier, later in itertools.pairwise(ran))


def test_a_stall_grace_under_a_second_is_refused(tmp_path: Path) -> None:
    """On amqp:// the dispatcher rounds a countdown up to whole seconds (docs/rabbitmq.md), so
    a retry may be delivered up to 1 s after not_before; start-by is not_before + the grace.
    With a grace under 1 s a retry delayed 1.2 s would get countdown 2 s and expire 1.7 s
    after sending: discarded when its ETA comes, every time."""
    with pytest.raises(ConfigurationError, match="SAGA_STALL_GRACE_SECONDS must be >= 1"):
        Settings.from_env({"SAGA_HOME": str(tmp_path), "SAGA_STALL_GRACE_SECONDS": "0.5"})


def test_a_rounded_up_amqp_countdown_ends_by_the_messages_expiry(tmp_path: Path) -> None:
    """With the shortest grace allowed (1 s), a retry whose countdown is rounded up still
    reaches its ETA no later than its `expires`."""
    definition = SagaDefinition("cd", [Step("only", NOOP, timeout_seconds=10)])
    settings = Settings.from_env(
        {
            "SAGA_HOME": str(tmp_path),
            "SAGA_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
            "SAGA_STALL_GRACE_SECONDS": "1",
        }
    )
    grace = settings.stall_grace_seconds
    now = datetime.now(UTC)
    decision = start(definition, StartRequested("s-cd", "cd", {}), now, settings.limits())
    not_before = now + timedelta(seconds=1.2)
    command = RunAttempt(
        "s-cd",
        0,
        Direction.FORWARD,
        2,
        not_before,
        not_before + timedelta(seconds=grace),
        task_id="t-2",
    )
    app = FakeApp()
    CeleryDispatcher(app, settings, KEY).send(definition, decision.saga, command)
    ((_, options),) = app.sent
    assert options["countdown"] == 2  # 1.2 s rounded up
    assert now + timedelta(seconds=options["countdown"]) <= options["expires"]
