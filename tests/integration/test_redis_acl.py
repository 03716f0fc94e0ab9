"""deploy/redis/users.acl on a real Redis: a producer user that can only push saga messages,
and a worker user that runs them (issue 14, item 11)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from tests.waiting import wait_for

from .conftest import REPO, WorkerProcess, fresh_postgres_database, start_worker
from .test_redis_variants import _free_port, _redis_server, _wait_ready

pytestmark = pytest.mark.integration

ACL = REPO / "deploy" / "redis" / "users.acl"
PRODUCER_PASSWORD = "producer-" + uuid.uuid4().hex
WORKER_PASSWORD = "worker-" + uuid.uuid4().hex


@pytest.fixture()
def acl_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis whose only users are those of deploy/redis/users.acl (test passwords)."""
    users = (
        ACL.read_text()
        .replace("CHANGE-ME-PRODUCER", PRODUCER_PASSWORD)
        .replace("CHANGE-ME-WORKER", WORKER_PASSWORD)
    )
    acl = tmp_path / "users.acl"
    acl.write_text(users)
    port = _free_port()
    log = tmp_path / "redis.log"
    process = subprocess.Popen(
        [
            _redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--aclfile",
            str(acl),
            "--dir",
            str(tmp_path),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    probe = redis.Redis(port=port, username="saga-worker", password=WORKER_PASSWORD)
    try:
        _wait_ready(probe, process, log)
        yield port
    finally:
        probe.close()
        process.terminate()
        process.wait(10)


def test_the_producer_user_can_start_sagas_and_nothing_else(
    acl_redis: int, pg_admin_url: str, tmp_path: Path
) -> None:
    port = acl_redis
    worker_url = f"redis://saga-worker:{WORKER_PASSWORD}@127.0.0.1:{port}/0"
    producer_url = f"redis://saga-producer:{PRODUCER_PASSWORD}@127.0.0.1:{port}/0"
    env = {
        "SAGA_DATABASE_URL": fresh_postgres_database(pg_admin_url),
        "SAGA_BROKER_URL": worker_url,
        "SAGA_QUEUE": "saga",  # the queue the ACL names
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(tmp_path),
    }
    worker: WorkerProcess = start_worker("saga_worker.app", env, "saga", tmp_path / "worker.log")
    producer = Celery("producer", broker=producer_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    client = redis.Redis(port=port, username="saga-producer", password=PRODUCER_PASSWORD)
    store = SagaStore(create_db_engine(env["SAGA_DATABASE_URL"]), Redactor(()))
    try:
        result = producer.send_task(
            "saga.start",
            kwargs={"saga_type": "backtest_workflow", "context": {"strategy_id": 1}},
            queue="saga",
        )
        saga = wait_for(
            lambda: s if (s := store.load(result.id)) and s.state.is_terminal else None,
            60,
            "the producer's saga to settle",
            details=lambda: worker.log_tail(),
        )
        assert saga.state.value == "COMPLETED"
        assert worker.process.poll() is None
        assert "NoPermissionError" not in worker.log_path.read_text(errors="replace")

        refused: dict[str, Callable[[], object]] = {
            "read the queue": lambda: client.lrange("saga", 0, -1),
            "take from the queue": lambda: client.rpop("saga"),
            "block on the queue": lambda: client.brpop(["saga"], timeout=1),
            "delete the queue": lambda: client.delete("saga"),
            "read unacked messages": lambda: client.hgetall("unacked"),
            "push to another queue": lambda: client.lpush("celery", "x"),
            "publish a remote control command": lambda: client.publish("/0.celery.pidbox", "x"),
            "list keys": lambda: client.keys("*"),
            "flush the database": lambda: client.flushall(),
            "read the configuration": lambda: client.config_get("*"),
            "change its own rights": lambda: client.acl_setuser("saga-producer", commands=["+get"]),
        }
        allowed: list[str] = []
        for what, attempt in refused.items():
            try:
                attempt()
            except redis.exceptions.NoPermissionError:
                continue
            allowed.append(what)
        assert allowed == [], f"the producer user could {allowed}"
    finally:
        client.close()
        producer.close()
        worker.stop()
        store.engine.dispose()
