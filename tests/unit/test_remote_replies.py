"""Where a remote step's result comes back: the saga's version queue, as the docs say."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from saga_worker.config import Settings
from saga_worker.core.definition import Remote, SagaDefinition, Step
from saga_worker.core.events import StartRequested
from saga_worker.core.model import Direction
from saga_worker.core.transition import start
from saga_worker.worker.dispatch import ADVANCE_TASK, CeleryDispatcher
from tests.unit.fake_celery import FakeApp

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 32


def test_a_remote_steps_result_and_failure_come_back_on_the_version_queue(
    tmp_path: Path,
) -> None:
    definition = SagaDefinition(
        "order",
        [Step("charge", Remote("billing.charge", "billing"), Remote("billing.refund", "billing"))],
        version="2",
    )
    decision = start(definition, StartRequested("s-1", "order", {}), datetime.now(UTC))
    (command,) = decision.commands
    app = FakeApp()
    settings = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    CeleryDispatcher(app, settings, KEY).send(definition, decision.saga, command)
    ((name, options),) = app.sent
    assert (name, options["queue"]) == ("billing.charge", "billing")
    for callback, outcome in (("link", "success"), ("link_error", "failure")):
        reply = options[callback]
        assert reply["task"] == ADVANCE_TASK
        assert reply["queue"] == "saga.order.2", callback  # not SAGA_QUEUE (`saga`)
        assert reply["kwargs"]["outcome"] == outcome
        assert reply["kwargs"]["direction"] == Direction.FORWARD.value


def test_the_docs_name_the_queue_remote_results_now_go_to() -> None:
    """Review 15: worker/dispatch.py attaches link/link_error signatures with queue
    `<SAGA_QUEUE>.<type>.<version>`, but docs/contract.md (Remote steps) said the callbacks
    hand the result to saga.advance 'on SAGA_QUEUE', and docs/rabbitmq.md that they 'send
    each result to the saga queue'. A remote service's broker permissions set up from these
    docs (a Redis ACL or RabbitMQ configure/write regex for `saga` only, as users.acl's
    saga-producer has) refuse its replies: every remote step stalls."""
    contract = (ROOT / "docs" / "contract.md").read_text()
    rabbit = (ROOT / "docs" / "rabbitmq.md").read_text()
    stale = [
        m.group(0)
        for text in (contract, rabbit)
        for m in re.finditer(
            r"(saga\.advance` on `SAGA_QUEUE`|send each result to the saga queue)", text
        )
    ]
    assert not stale, f"stale claims: {stale}"
    security = " ".join((ROOT / "docs" / "security.md").read_text().split())
    # The remote service's example Redis user may push to the version queues.
    (remote_user,) = re.findall(r"user saga-remote [^`]*", security)
    assert "+lpush" in remote_user and "~saga.*" in remote_user
    assert "~_kombu.binding.saga.*" in remote_user
    assert "version queue" in " ".join(contract.split()).split("### Remote steps")[1][:1200]
