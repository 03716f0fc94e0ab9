"""Redis over TLS (rediss://) and through Sentinel (sentinel://): the same guarded transport.

Real servers: a TLS-only redis-server with a CA made here, and a redis-server in Sentinel
mode watching the test Redis; real worker processes configured through SAGA_CELERY_CONFIG.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from tests.requirements import unavailable
from tests.waiting import wait_for

from .conftest import WorkerProcess, fresh_postgres_database, start_worker


@dataclass
class Variant:
    broker_url: str  # what the saga worker and the producer use
    raw: redis.Redis  # a direct client of the Redis server holding the queues
    config_module: str
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server() -> str:
    path = os.environ.get("SAGA_TEST_REDIS_SERVER")
    if not path:
        unavailable("SAGA_TEST_REDIS_SERVER is not set: run the suite with scripts/test.sh")
    return path


def _wait_ready(client: redis.Redis, process: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        return bool(client.ping())

    wait_for(ready, 20, "the Redis server", ignore=(redis.RedisError,), details=log.read_text)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture()
def tls_redis(tmp_path: Path) -> Iterator[Variant]:
    server = _redis_server()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=saga-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=tmp_path,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=tmp_path,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-copy_extensions",
        "copy",
        "-out",
        "server.pem",
        cwd=tmp_path,
    )
    port = _free_port()
    log = tmp_path / "redis-tls.log"
    process = subprocess.Popen(
        [
            server,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=tmp_path,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0"
    raw = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(tmp_path / "ca.pem"))
    try:
        _wait_ready(raw, process, log)
        yield Variant(
            url, raw, "tests.fixtures.celery_tls", {"IT_REDIS_CA": str(tmp_path / "ca.pem")}
        )
    finally:
        raw.close()
        process.terminate()
        process.wait(10)


@pytest.fixture()
def sentinel_redis(tmp_path: Path, broker_url: str) -> Iterator[Variant]:
    server = _redis_server()
    master = redis.Redis.from_url(broker_url)
    port = _free_port()
    master_port = master.connection_pool.connection_kwargs["port"]
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor saga-test-master 127.0.0.1 {master_port} 1\n"
    )
    log = tmp_path / "sentinel.log"
    process = subprocess.Popen(
        [server, str(conf), "--sentinel"], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    probe = redis.Redis(host="127.0.0.1", port=port)
    try:
        _wait_ready(probe, process, log)
        yield Variant(f"sentinel://127.0.0.1:{port}", master, "tests.fixtures.celery_sentinel", {})
    finally:
        probe.close()
        master.close()
        process.terminate()
        process.wait(10)


@dataclass
class VariantRig:
    """A saga worker and a producer on one Redis variant, with a fresh database."""

    queue: str
    worker: WorkerProcess
    producer: Celery
    store: SagaStore

    @classmethod
    def start(cls, variant: Variant, database_url: str, folder: Path, prefix: str) -> VariantRig:
        queue = f"{prefix}-{uuid.uuid4().hex[:8]}"
        env = {
            "SAGA_DATABASE_URL": database_url,
            "SAGA_BROKER_URL": variant.broker_url,
            "SAGA_QUEUE": queue,
            "SAGA_IMPORTS": "saga_worker.examples",
            "SAGA_HOME": str(folder),
            "SAGA_SIGNING_KEY": "k" * 40,
            "SAGA_CELERY_CONFIG": variant.config_module,
            **variant.env,
        }
        worker = start_worker("saga_worker.app", env, queue, folder / "worker.log")
        os.environ.update(variant.env)  # the producer reads the same config module
        # ... as a module read when first imported: another test's fixture may have imported
        # it with its own server's CA.
        sys.modules.pop(variant.config_module, None)
        producer = Celery("producer", broker=variant.broker_url, set_as_current=False)
        producer.config_from_object(variant.config_module)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        store = SagaStore(create_db_engine(database_url), Redactor([]))
        return cls(queue, worker, producer, store)

    def start_saga(self, n: int) -> str:
        """Start a backtest saga as a producer does; returns its id."""
        saga_id = f"{self.queue}-{n}-{uuid.uuid4().hex[:6]}"
        kwargs = {"saga_type": "backtest_workflow", "context": {"strategy_id": n}}
        self.producer.send_task(
            "saga.start", kwargs={**kwargs, "saga_id": saga_id}, queue=self.queue
        )
        return saga_id

    def close(self) -> None:
        self.worker.stop()
        self.producer.close()
        self.store.engine.dispose()


@pytest.mark.parametrize("flavour", ["tls_redis", "sentinel_redis"])
def test_the_worker_drops_queue_items_that_are_not_messages_and_keeps_serving(
    flavour: str, request: pytest.FixtureRequest, pg_admin_url: str, tmp_path: Path
) -> None:
    variant: Variant = request.getfixturevalue(flavour)
    rig = VariantRig.start(variant, fresh_postgres_database(pg_admin_url), tmp_path, "rv")
    try:
        first = rig.start_saga(1)
        wait_completed(rig.store, first)
        # Anyone who can write to the broker: garbage on the saga queue's list.
        variant.raw.lpush(rig.queue, b"\x00\xffgarbage", b"{}", b"[" * 200_000)
        second = rig.start_saga(2)
        wait_completed(rig.store, second)
        worker = rig.worker
        assert worker.process.poll() is None, worker.log_tail()
        log = worker.log_path.read_text(errors="replace")
        assert "dropped a queue item" in log, worker.log_tail()
        assert "Unrecoverable error" not in log
    finally:
        rig.close()


def wait_completed(store: SagaStore, saga_id: str, timeout: float = 60) -> None:
    saga = wait_for(
        lambda: saga if (saga := store.load(saga_id)) and saga.state.is_terminal else None,
        timeout,
        f"{saga_id} to be terminal",
        details=lambda: store.load(saga_id),
    )
    assert saga.state.value == "COMPLETED", saga
