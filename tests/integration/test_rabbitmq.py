"""The engine on RabbitMQ: real Celery workers on a real RabbitMQ node and PostgreSQL.

The core scenarios are the Redis tests' own bodies run on a RabbitMQ stack; hostile input is
published raw with kombu (py-amqp) onto the saga queue. Needs SAGA_TEST_AMQP_URL (scripts/test.sh
starts a throwaway node): missing, these tests fail in CI and skip elsewhere.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from sqlalchemy import func, select

from saga_worker import registry
from saga_worker.config import Settings
from saga_worker.examples.backtest import example_backtests
from saga_worker.store.tables import audit_logs, checkpoints
from saga_worker.worker.app import create_app

from . import test_chaos as chaos
from . import test_engine as engine
from .conftest import Stack, fresh_postgres_database
from .processes import Rig

pytestmark = pytest.mark.integration
# The session's RabbitMQ stack: PostgreSQL, a saga worker and a remote-service worker.
ON_RABBITMQ = pytest.mark.parametrize("stack", ["rabbitmq"], indirect=True)

SAGA_TYPE = "backtest_workflow"
PROBLEM_LINE = re.compile(r"^\[[^]]*: (?:WARNING|ERROR|CRITICAL)/MainProcess\].*$", re.MULTILINE)


# -- the core scenarios ----------------------------------------------------------------------


@ON_RABBITMQ
def test_completes_and_records_every_transition(stack: Stack) -> None:
    engine.test_completes_and_records_every_transition(stack)


@ON_RABBITMQ
def test_failure_compensates_completed_steps_in_reverse(stack: Stack) -> None:
    engine.test_failure_compensates_completed_steps_in_reverse(stack)


@ON_RABBITMQ
def test_flaky_step_is_retried_then_completes(stack: Stack) -> None:
    engine.test_flaky_step_is_retried_then_completes(stack)


@ON_RABBITMQ
def test_abort_mid_run_compensates_and_ends_aborted(stack: Stack) -> None:
    engine.test_abort_mid_run_compensates_and_ends_aborted(stack)


@ON_RABBITMQ
def test_remote_step_served_by_another_service(stack: Stack) -> None:
    engine.test_remote_step_served_by_another_service(stack)


@ON_RABBITMQ
def test_remote_step_failure_retries_then_compensates(stack: Stack) -> None:
    engine.test_remote_step_failure_retries_then_compensates(stack)


@ON_RABBITMQ
def test_audit_chains_of_concurrent_sagas_verify(stack: Stack) -> None:
    contexts: list[dict[str, Any]] = [
        {"strategy_id": 1},
        {"strategy_id": 2, "fail_step": "run_strategy"},
        {"strategy_id": 3, "flaky_step": {"step": "save_results", "failures": 1}},
        {"strategy_id": 4, "fail_step": "save_results", "fail_compensation": "create_backtest"},
    ]
    saga_ids = [stack.start(SAGA_TYPE, context) for context in contexts]
    final = stack.wait_all(saga_ids, timeout=120)
    assert [final[s].state.value for s in saga_ids] == [
        "COMPLETED",
        "COMPENSATED",
        "COMPLETED",
        "FAILED",
    ]
    for saga_id in saga_ids:
        stack.assert_chain_ok(saga_id)
        assert stack.events(saga_id)[0] == "saga_start"


# -- publisher confirms ----------------------------------------------------------------------


@pytest.mark.parametrize("confirmed", [True, False], ids=["app-settings", "without-confirms"])
def test_a_publish_the_broker_drops_raises_with_the_apps_settings(
    amqp_url: str, tmp_path: Path, confirmed: bool
) -> None:
    """RabbitMQ drops a message sent to an exchange that does not exist. With the app's
    publisher confirms the publish raises; without them (the control) it returns as if sent."""
    app = create_app(Settings.from_env({"SAGA_BROKER_URL": amqp_url, "SAGA_HOME": str(tmp_path)}))
    if not confirmed:
        app.conf.broker_transport_options = {}
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        missing = f"missing-{uuid.uuid4().hex[:8]}"
        if confirmed:
            with pytest.raises(conn.channel_errors):
                producer.publish({"x": 1}, exchange=missing, routing_key="x", declare=[])
        else:
            producer.publish({"x": 1}, exchange=missing, routing_key="x", declare=[])


# -- hostile input ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """One message as anyone with write access to the broker could publish it."""

    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict[str, Any] | None = None  # None: a well-formed saga.start's headers


def _start_body(saga_id: str) -> bytes:
    kwargs = {"saga_type": SAGA_TYPE, "context": {"strategy_id": 1}, "saga_id": saga_id}
    return json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None}]).encode()


def _hostile(marker: str) -> dict[str, Raw]:
    """Each case breaks one thing; those with a valid body would start saga `marker`."""
    good = _start_body(marker)
    start = {"task": "saga.start", "id": marker, "lang": "py"}
    return {
        "body_of_the_wrong_shape": Raw(json.dumps({"not": "a list"}).encode()),
        "body_a_json_string": Raw(b'"saga.start"'),
        "body_a_json_number": Raw(b"5"),
        "missing_id_header": Raw(good, headers={"task": "saga.start", "lang": "py"}),
        "list_task_header": Raw(good, headers={"task": ["saga.start"], "id": marker}),
        "missing_task_header": Raw(good, headers={"id": marker, "lang": "py"}),
        "unknown_content_type": Raw(good, content_type="application/x-unknown"),
        "unknown_content_encoding": Raw(good, content_encoding="x-no-such-codec"),
        "unknown_compression": Raw(
            good, headers={"task": "saga.start", "id": marker, "compression": "x-nope"}
        ),
        "nested_brackets": Raw(b"[" * 200_000 + b"]" * 200_000),
        "pickle_body": Raw(
            pickle.dumps(((), json.loads(good)[1], {})),
            content_type="application/x-python-serialize",
            content_encoding="binary",
        ),
        "non_utf8_bytes": Raw(b"\xff\xfe\x00[[], {\xc3\x28}]"),
        # Headers Celery reads after the handler: each used to stop or wedge the worker.
        "timelimit_of_strings": Raw(good, headers={**start, "timelimit": ["x", "y"]}),
        "timelimit_a_number": Raw(good, headers={**start, "timelimit": 5}),
        "stamped_headers_a_number": Raw(good, headers={**start, "stamped_headers": 5}),
        # 100 MB of zeros in 100 KB: refused before anything decompresses it.
        "gzip_bomb": Raw(
            zlib.compress(b"\0" * 100_000_000, 9),
            headers={**start, "compression": "application/x-gzip"},
        ),
    }


HOSTILE_CASES = sorted(_hostile("x"))


def _row_counts(stack: Stack) -> dict[str, int]:
    with stack.store.engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (checkpoints, audit_logs, example_backtests)
        }


def _queue_depth(stack: Stack) -> int:
    """Messages ready on the saga queue (a passive declare: fails if the queue is gone)."""
    with Connection(stack.broker_url) as conn:
        _, ready, _ = conn.default_channel.queue_declare(queue=stack.queue, passive=True)
        return int(ready)


@ON_RABBITMQ
@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_message_is_dropped_and_the_worker_keeps_serving(stack: Stack, case: str) -> None:
    worker = stack.workers[0]
    pid = worker.process.pid
    marker = f"hostile-{uuid.uuid4().hex[:12]}"
    raw = _hostile(marker)[case]
    headers = (
        raw.headers
        if raw.headers is not None
        else {
            "task": "saga.start",
            "id": str(uuid.uuid4()),
            "lang": "py",
        }
    )
    before = _row_counts(stack)
    log_offset = worker.log_path.stat().st_size
    with Connection(stack.broker_url) as conn:
        conn.Producer().publish(
            raw.body,
            exchange="",
            routing_key=stack.queue,
            content_type=raw.content_type,
            content_encoding=raw.content_encoding,
            headers=headers,
        )
    # The queue is FIFO: by the time a saga started after the message has completed, the
    # worker has taken the hostile message off the queue and dealt with it.
    good = stack.start(SAGA_TYPE, {"strategy_id": 5})
    saga = stack.wait(good, timeout=60)
    assert saga.state.value == "COMPLETED", saga.error
    assert worker.process.poll() is None, worker.log_tail()
    assert worker.process.pid == pid
    # Nothing but the good saga's rows reached the database.
    after = _row_counts(stack)
    assert after == {
        "saga_checkpoints": before["saga_checkpoints"] + 1,
        "saga_audit_logs": before["saga_audit_logs"] + len(engine.HAPPY),
        "example_backtests": before["example_backtests"] + 1,
    }, (before, after)
    assert stack.store.load(marker) is None
    # Dropped, not requeued to come round again, and logged once.
    assert _queue_depth(stack) == 0
    with worker.log_path.open("rb") as log:
        log.seek(log_offset)
        complaints = PROBLEM_LINE.findall(log.read().decode(errors="replace"))
    assert len(complaints) == 1, complaints


# -- chaos -----------------------------------------------------------------------------------

CHAOS_SAGAS = 80
CHAOS_SUBMIT_SECONDS = 20.0


def test_no_saga_is_lost_or_applied_twice_when_workers_are_killed(
    pg_admin_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """test_chaos's run on RabbitMQ, smaller: pool children and whole workers SIGKILLed
    while sagas run and a beat sweeps (the broker and PostgreSQL stay up)."""
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        amqp_url,
        tmp_path,
        SAGA_STALL_GRACE_SECONDS=chaos.GRACE,
        SAGA_RECOVERY_INTERVAL_SECONDS="1",
    )

    def plan(rng: random.Random) -> list[tuple[float, Callable[[chaos.Chaos], None]]]:
        def child(run: chaos.Chaos) -> None:
            chaos.kill_child(rig, run, rng)

        def worker(run: chaos.Chaos) -> None:
            chaos.kill_worker(rig, run)

        return [
            (rng.uniform(2, 4), child),
            (rng.uniform(5, 8), worker),
            (rng.uniform(9, 11), child),
            (rng.uniform(12, 15), child),
            (rng.uniform(16, 19), worker),
            (rng.uniform(20, 22), child),
        ]

    try:
        outcome = chaos.run_chaos(rig, CHAOS_SAGAS, CHAOS_SUBMIT_SECONDS, plan, name="rabbit-chaos")
    finally:
        rig.close()
    assert outcome.chaos.counts["worker kills"] == 2
    assert outcome.chaos.counts["pool child kills"] == 4


# -- quorum queue ----------------------------------------------------------------------------


def test_sagas_run_on_a_quorum_queue(pg_admin_url: str, amqp_url: str, tmp_path: Path) -> None:
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        amqp_url,
        tmp_path,
        SAGA_CELERY_CONFIG="tests.fixtures.quorum_settings",
    )
    # A producer declares the queue it sends to: with the worker's arguments, or RabbitMQ
    # refuses the declare (inequivalent x-queue-type) and the send fails.
    rig.producer.conf.update(
        task_create_missing_queue_type="quorum", task_create_missing_queue_exchange_type="topic"
    )
    try:
        rig.start_worker()
        with Connection(amqp_url) as conn:
            # Succeeds only on a queue that is already a quorum queue: RabbitMQ refuses a
            # declare whose x-queue-type differs from the existing queue's.
            conn.default_channel.queue_declare(
                queue=rig.queue,
                durable=True,
                auto_delete=False,
                arguments={"x-queue-type": "quorum"},
            )
        plain = rig.start_saga(SAGA_TYPE, {"strategy_id": 11}, f"quorum-{uuid.uuid4().hex[:8]}")
        # Two failed attempts: their retries are sent with a countdown (delayed delivery).
        flaky = rig.start_saga(
            SAGA_TYPE,
            {"strategy_id": 12, "flaky_step": {"step": "run_strategy", "failures": 2}},
            f"quorum-{uuid.uuid4().hex[:8]}",
        )
        final = rig.wait_all([plain, flaky], timeout=90)
        assert final[plain].state.value == "COMPLETED"
        assert final[flaky].state.value == "COMPLETED" and final[flaky].retries == 2
        log = rig.worker.log_path.read_text(errors="replace")
        assert "Global QoS is disabled" in log  # Celery saw the quorum queue
        # The steps ran on the version's own queue (docs/deploys.md): a quorum queue too.
        version_queue = f"{rig.queue}.{SAGA_TYPE}.{registry.get(SAGA_TYPE).version}"
        with Connection(amqp_url) as conn:
            # It exists (a passive declare fails on a missing queue)...
            conn.default_channel.queue_declare(queue=version_queue, passive=True)
            # ...and is a quorum queue (RabbitMQ refuses an inequivalent x-queue-type).
            conn.default_channel.queue_declare(
                queue=version_queue,
                durable=True,
                auto_delete=False,
                arguments={"x-queue-type": "quorum"},
            )
    finally:
        rig.close()
