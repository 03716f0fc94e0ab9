"""Flower tells the truth: failed step attempts show FAILURE, retried ones RETRY.

A real worker (prefork) and a real Flower on a fresh database and queue; states are read
back through Flower's HTTP API, the audit trail from the database.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from tests.waiting import as_logged

from .conftest import WorkerProcess, fresh_postgres_database, start_worker
from .test_metrics import FLOWER_AUTH, Service, free_port, http_get, spawn, wait_for

pytestmark = pytest.mark.integration

BT = "saga.backtest_workflow."
TO = "saga.it_timeout."
ET = "saga.it_error_text."


@dataclass
class Watched:
    queue: str
    store: SagaStore
    worker: WorkerProcess
    flower: Service
    flower_port: int
    producer: Celery
    broker_url: str

    def logs(self) -> str:
        return f"--- worker\n{self.worker.log_tail(60)}\n--- flower\n{self.flower.log_tail(20)}"

    def start(self, saga_type: str, context: dict[str, Any]) -> str:
        saga_id = f"fl-{uuid.uuid4().hex[:12]}"
        self.producer.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": context, "saga_id": saga_id},
            queue=self.queue,
        )
        return saga_id

    def flower_tasks(self, saga_id: str) -> list[dict[str, Any]]:
        base = f"http://127.0.0.1:{self.flower_port}"
        tasks = json.loads(http_get(f"{base}/api/tasks?limit=100000", auth=FLOWER_AUTH))
        return [
            t
            for t in tasks.values()
            if saga_id in str(t.get("kwargs")) and str(t.get("name")).startswith((BT, TO, ET))
        ]


@pytest.fixture(scope="module")
def watched(
    broker_url: str, pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Watched]:
    folder = tmp_path_factory.mktemp("flower-states")
    database_url = fresh_postgres_database(pg_admin_url)
    queue = f"it-flower-{uuid.uuid4().hex[:8]}"
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": "saga_worker.examples,tests.fixtures.sagas",
        "SAGA_HOME": str(folder),
    }
    flower_port = free_port()
    flower = spawn(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "saga_worker.app",
            "flower",
            f"--port={flower_port}",
            "--address=127.0.0.1",
        ],
        {**env, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
        folder / "flower.log",
    )
    producer = Celery("it-flower-producer", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    store = SagaStore(create_db_engine(database_url), Redactor([]))
    worker = None
    try:
        worker = start_worker("saga_worker.app", env, queue, folder / "worker.log", concurrency=2)
        obs = Watched(queue, store, worker, flower, flower_port, producer, broker_url)
        wait_for(
            "Flower",
            lambda: http_get(f"http://127.0.0.1:{flower_port}/healthcheck") == b"OK",
            60,
            obs.logs,
        )
        # Flower only knows tasks whose events it receives: wait until it has turned the
        # worker's task events on.
        wait_for(
            "Flower to enable the worker's task events",
            lambda: b"Events of group {task} enabled by remote" in worker.log_path.read_bytes(),
            60,
            obs.logs,
        )
        yield obs
    finally:
        if worker is not None:
            worker.stop()
        flower.stop()
        producer.close()
        store.engine.dispose()


FAILED_RUN_STRATEGY = [
    ("saga_start", None),
    ("step_start", "create_backtest"),
    ("step_complete", "create_backtest"),
    ("step_start", "run_strategy"),
    ("step_retry", "run_strategy"),
    ("step_start", "run_strategy"),
    ("step_retry", "run_strategy"),
    ("step_start", "run_strategy"),
    ("step_failed", "run_strategy"),
    ("compensation_start", "create_backtest"),
    ("compensation_complete", "create_backtest"),
    ("saga_compensated", None),
]
FLAKY_SAVE_RESULTS = [
    ("saga_start", None),
    ("step_start", "create_backtest"),
    ("step_complete", "create_backtest"),
    ("step_start", "run_strategy"),
    ("step_complete", "run_strategy"),
    ("step_start", "save_results"),
    ("step_retry", "save_results"),
    ("step_start", "save_results"),
    ("step_complete", "save_results"),
    ("saga_complete", None),
]
TIMED_OUT_SLEEPY = [
    ("saga_start", None),
    ("step_start", "prepare"),
    ("step_complete", "prepare"),
    ("step_start", "sleepy"),
    ("step_retry", "sleepy"),
    ("step_start", "sleepy"),
    ("step_failed", "sleepy"),
    # Timed out, so its effect is unknown: it is compensated itself first.
    ("compensation_start", "sleepy"),
    ("compensation_complete", "sleepy"),
    ("compensation_start", "prepare"),
    ("compensation_complete", "prepare"),
    ("saga_compensated", None),
]
GARBLED = [
    ("saga_start", None),
    ("step_start", "prepare"),
    ("step_complete", "prepare"),
    ("step_start", "garbled"),
    ("step_failed", "garbled"),
    ("compensation_start", "prepare"),
    ("compensation_complete", "prepare"),
    ("saga_compensated", None),
]


def test_flower_shows_failed_and_retried_attempts(watched: Watched) -> None:
    """fail_step, flaky_step, a timed-out step and an unsightly error, as the engine saw them."""
    sagas = {
        "fail": watched.start("backtest_workflow", {"strategy_id": 3, "fail_step": "run_strategy"}),
        "flaky": watched.start(
            "backtest_workflow",
            {"strategy_id": 4, "flaky_step": {"step": "save_results", "failures": 1}},
        ),
        # it_timeout's sleepy step has a 1 s timeout and 2 attempts.
        "timeout": watched.start("it_timeout", {"sleep": 3}),
        # garbled raises with NUL, an escape sequence and a password in its message.
        "garbled": watched.start("it_error_text", {}),
    }
    expected_states = {
        "fail": Tally(
            {
                (f"{BT}create_backtest", "SUCCESS"): 1,
                (f"{BT}run_strategy", "RETRY"): 2,
                (f"{BT}run_strategy", "FAILURE"): 1,
                (f"{BT}create_backtest.compensate", "SUCCESS"): 1,
            }
        ),
        "flaky": Tally(
            {
                (f"{BT}create_backtest", "SUCCESS"): 1,
                (f"{BT}run_strategy", "SUCCESS"): 1,
                (f"{BT}save_results", "RETRY"): 1,
                (f"{BT}save_results", "SUCCESS"): 1,
            }
        ),
        "timeout": Tally(
            {
                (f"{TO}prepare", "SUCCESS"): 1,
                (f"{TO}sleepy", "RETRY"): 1,
                (f"{TO}sleepy", "FAILURE"): 1,
                # Timed out: its effect is unknown, so it is compensated itself first.
                (f"{TO}sleepy.compensate", "SUCCESS"): 1,
                (f"{TO}prepare.compensate", "SUCCESS"): 1,
            }
        ),
        "garbled": Tally(
            {
                (f"{ET}prepare", "SUCCESS"): 1,
                (f"{ET}garbled", "FAILURE"): 1,
                (f"{ET}prepare.compensate", "SUCCESS"): 1,
            }
        ),
    }
    trails = {
        "fail": FAILED_RUN_STRATEGY,
        "flaky": FLAKY_SAVE_RESULTS,
        "timeout": TIMED_OUT_SLEEPY,
        "garbled": GARBLED,
    }
    final = {
        "fail": "COMPENSATED",
        "flaky": "COMPLETED",
        "timeout": "COMPENSATED",
        "garbled": "COMPENSATED",
    }

    def settled() -> bool:
        loaded = [watched.store.load(i) for i in sagas.values()]
        return all(s is not None and s.state.is_terminal for s in loaded)

    wait_for("the sagas to settle", settled, 90, watched.logs)

    def shown(name: str) -> Tally[tuple[str, str]]:
        return Tally((t["name"], t["state"]) for t in watched.flower_tasks(sagas[name]))

    for name, expected in expected_states.items():
        # Called within this iteration only: the closures see this iteration's values.
        wait_for(
            f"Flower's states for {name}",
            lambda: shown(name) == expected,  # noqa: B023
            30,
            lambda: f"{name}: {shown(name)}\n{watched.logs()}",  # noqa: B023
        )
        saga = watched.store.load(sagas[name])
        assert saga is not None and saga.state.value == final[name]
        rows = watched.store.audit_trail(sagas[name])
        # Exactly the engine's transitions: no extra step_start/step_retry from a Celery retry.
        assert [(r["event_type"], r["step_name"]) for r in rows] == trails[name]

    # What Flower shows of a failure: the step's error type and message.
    fail_tasks = watched.flower_tasks(sagas["fail"])
    failed = [t for t in fail_tasks if t["state"] == "FAILURE"]
    assert "InjectedFailure" in failed[0]["exception"]
    assert "injected failure of step run_strategy" in failed[0]["exception"]
    retried = [t for t in fail_tasks if t["state"] == "RETRY"]
    assert all("InjectedFailure" in t["exception"] for t in retried)
    timed_out = [t for t in watched.flower_tasks(sagas["timeout"]) if t["state"] == "FAILURE"]
    assert "StepTimeout" in timed_out[0]["exception"]
    (garbled,) = [t for t in watched.flower_tasks(sagas["garbled"]) if t["state"] == "FAILURE"]
    assert "x00byte" in garbled["exception"] and "REDACTED" in garbled["exception"]
    assert "hunter2" not in garbled["exception"] and len(garbled["exception"]) < 700

    # One attempt, one message: nothing re-published by Celery (Task.retry reuses the id).
    log = watched.worker.log_path.read_text(errors="replace")
    for name, expected in expected_states.items():
        ids = {t["uuid"] for t in watched.flower_tasks(sagas[name])}
        assert len(ids) == sum(expected.values())
        for task_id in ids:
            assert log.count(f"[{as_logged(task_id)}] received") == 1, task_id
        # The console links each attempt to Flower by the task id its start row records.
        recorded = {
            r["event_data"]["task_id"]
            for r in watched.store.audit_trail(sagas[name])
            if r["event_type"] in ("step_start", "compensation_start")
        }
        assert ids == recorded, name
    # Acked, not left for redelivery: kombu's Redis transport keeps a message it delivered
    # in the `unacked` hash until the worker acks it.
    failed_ids = [
        t["uuid"]
        for name in sagas.values()
        for t in watched.flower_tasks(name)
        if t["state"] in ("RETRY", "FAILURE")
    ]
    assert len(failed_ids) == 7
    with redis.Redis.from_url(watched.broker_url) as client:
        unacked = client.hvals("unacked")
    assert not [i for i in failed_ids if any(i.encode() in v for v in unacked)]
    # Readable log: one line per failed attempt with its error, no traceback.
    assert "Traceback" not in log, watched.logs()
    assert re.search(r"raised expected: .*InjectedFailure.*run_strategy", log), watched.logs()
    assert re.search(r"retry: Retry in [\d.]+s: .*InjectedFailure", log), watched.logs()
