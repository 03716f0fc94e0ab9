"""Review of issue 14, item 6: a retry's broker countdown against its `expires`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from saga_worker.config import Settings
from saga_worker.core.commands import RunAttempt
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import StartRequested
from saga_worker.core.model import Direction
from saga_worker.core.transition import start
from saga_worker.worker.dispatch import CeleryDispatcher
from tests.unit.test_dispatch_expiry import KEY, FakeApp

DEFINITION = SagaDefinition("review_cd", [Step("only", lambda call: {}, timeout_seconds=10)])


def test_a_rounded_up_amqp_countdown_does_not_outlast_the_messages_expiry(tmp_path: Path) -> None:
    """On amqp:// the dispatcher rounds a countdown up to whole seconds (docs/rabbitmq.md), so
    the ETA can be up to 1 s after not_before; start-by is not_before + the grace. With
    SAGA_STALL_GRACE_SECONDS below 1 (the config accepts any value > 0) a retry delayed 1.2 s
    gets countdown 2 s and expires 1.7 s after sending: the worker discards it when its ETA
    comes, every time, and each such retry waits for its deadline and a recovery."""
    grace = 0.5
    settings = Settings.from_env(
        {
            "SAGA_HOME": str(tmp_path),
            "SAGA_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
            "SAGA_STALL_GRACE_SECONDS": str(grace),
        }
    )
    now = datetime.now(UTC)
    decision = start(DEFINITION, StartRequested("s-cd", "review_cd", {}), now, Limits(grace))
    not_before = now + timedelta(seconds=1.2)
    command = RunAttempt(
        "s-cd", 0, Direction.FORWARD, 2, not_before, not_before + timedelta(seconds=grace)
    )
    app = FakeApp()
    CeleryDispatcher(app, settings, KEY).send(DEFINITION, decision.saga, command)
    ((_, options),) = app.sent
    eta = now + timedelta(seconds=options["countdown"])
    assert eta <= options["expires"], (
        f"ETA {eta.time()} is after the message's expires {options['expires'].time()}: "
        "the retry can never start"
    )
