"""Step messages carry their start-by time as Celery's `expires`; the sweep's does not expire
by anyone's clock (issue 14, item 6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from saga_worker.config import Settings
from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested
from saga_worker.core.transition import start
from saga_worker.worker.app import RECOVERY_ENTRY, SweepGate, create_app
from saga_worker.worker.dispatch import CeleryDispatcher

NOOP: Any = lambda call: {}  # noqa: E731
KEY = "k" * 32


class FakeApp:
    """Records send_task calls; signature() returns its kwargs."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append((name, options))

    def signature(self, name: str, **options: Any) -> dict[str, Any]:
        return {"task": name, **options}


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
        "s-1", 1, command.direction, 1, command.not_before, command.start_by + timedelta(1)
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
    gate.done()
    now[0] += 1.0  # the next queued sweep right after: same overdue attempts, skipped
    assert not gate.open()
    now[0] += 4.0
    assert gate.open()
