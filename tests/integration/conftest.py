"""Real services for integration tests: PostgreSQL, Redis, RabbitMQ and Celery workers.

The services come from SAGA_TEST_DATABASE_URL / SAGA_TEST_BROKER_URL / SAGA_TEST_AMQP_URL
(scripts/test.sh starts them). When they are missing the tests fail in CI and skip elsewhere,
with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select, text

from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import verify_chain
from saga_worker.core.model import Saga
from saga_worker.examples.backtest import example_backtests
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from tests.requirements import unavailable
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
#: The signing key of every worker, beat and CLI the integration tests start (required with
#: PostgreSQL); subprocesses inherit it from this process's environment.
SIGNING_KEY = os.environ.setdefault("SAGA_SIGNING_KEY", "saga-worker-integration-tests-key-0001")
WORKER_IMPORTS = "saga_worker.examples,tests.fixtures.sagas"


def _require(name: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    unavailable(f"{name} is not set: run the suite with scripts/test.sh, which starts the servers")


@pytest.fixture(scope="session")
def broker_url() -> str:
    return _require("SAGA_TEST_BROKER_URL")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ broker (amqp://): the Redis-only tests never ask for it."""
    return _require("SAGA_TEST_AMQP_URL")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return _require("SAGA_TEST_DATABASE_URL")


def empty_postgres_database(admin_url: str) -> str:
    """A new empty database on the test server; returns its URL."""
    name = f"it_{uuid.uuid4().hex[:12]}"
    admin = create_db_engine(admin_url, pool=False).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def fresh_postgres_database(admin_url: str) -> str:
    """A new database on the test server, migrated; returns its URL."""
    url = empty_postgres_database(admin_url)
    engine = create_db_engine(url, pool=False)
    upgrade(engine)
    engine.dispose()
    return url


def migrated_database(backend: str, pg_admin_url: str, folder: Path) -> str:
    """A migrated database on PostgreSQL (a new one on the test server) or SQLite (in
    `folder`); returns its URL."""
    if backend == "postgres":
        return fresh_postgres_database(pg_admin_url)
    return fresh_sqlite_database(folder)


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request: pytest.FixtureRequest, pg_admin_url: str, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a migrated database, PostgreSQL then SQLite (`indirect` picks one)."""
    db = create_db_engine(migrated_database(str(request.param), pg_admin_url, tmp_path))
    yield db
    db.dispose()


def make_0_1_database(url: str) -> str:
    """Turn a migrated database into what 0.1 left; returns the revision."""
    engine = create_db_engine(url, pool=False)
    with engine.begin() as conn:
        head = str(conn.execute(text("SELECT version_num FROM saga_alembic_version")).scalar_one())
        conn.execute(text("DROP TABLE saga_alembic_version"))
        conn.execute(
            text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
        )
        conn.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": head})
    engine.dispose()
    return head


def runtime_role_url(owner_url: str) -> str:
    """A new role given the run-time privileges (`saga-worker db grant`, plus the example
    tables) on the database at `owner_url`; returns the URL that connects as it.

    Workers of the PostgreSQL stacks connect with it, as in production: the tests then show
    that nothing the workers do needs more (issue 14)."""
    from sqlalchemy.engine import make_url

    from saga_worker.examples.backtest import create_tables
    from saga_worker.store.grants import grant_runtime

    role = f"it_app_{uuid.uuid4().hex[:8]}"
    engine = create_db_engine(owner_url, pool=False)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    grant_runtime(engine, role, create_tables(engine))
    engine.dispose()
    return make_url(owner_url).set(username=role, password=None).render_as_string(False)


def fresh_sqlite_database(folder: Path) -> str:
    url = f"sqlite:///{folder / 'saga.sqlite3'}"
    engine = create_db_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@dataclass
class WorkerProcess:
    """A `celery worker` subprocess and its log file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "<no log>"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_worker(
    app_module: str,
    env: dict[str, str],
    queues: str,
    log_path: Path,
    *,
    concurrency: int = 2,
    extra_args: tuple[str, ...] = (),
) -> WorkerProcess:
    """Start a real Celery worker process and wait until it says it is ready."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app_module,
            "worker",
            "-Q",
            queues,
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{uuid.uuid4().hex[:8]}@%h",
            *extra_args,
        ],
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    worker = WorkerProcess(process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{worker.log_tail()}")
        if b" ready." in log_path.read_bytes():
            return worker
        time.sleep(0.1)
    worker.stop(signal.SIGKILL)
    raise RuntimeError(f"worker not ready within 60 s:\n{worker.log_tail()}")


@dataclass
class Stack:
    """One backend under test: its database, a saga worker, a producer and a remote service."""

    backend: str
    database_url: str
    broker_url: str
    queue: str
    remote_queue: str
    store: SagaStore
    producer: Celery
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self, saga_type: str, context: dict[str, Any], **fields: Any) -> str:
        """Start a saga exactly as an outside producer does: send_task by name."""
        saga_id = fields.pop("saga_id", None) or f"{self.backend}-{uuid.uuid4().hex[:12]}"
        self.producer.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": context, "saga_id": saga_id, **fields},
            queue=self.queue,
        )
        return saga_id

    def send(self, name: str, kwargs: dict[str, Any]) -> str:
        """Send task `name` to the saga worker; returns the message's task id."""
        task_id = uuid.uuid4().hex
        self.producer.send_task(name, kwargs=kwargs, queue=self.queue, task_id=task_id)
        return task_id

    def worker_logs(self) -> list[Path]:
        return [w.log_path for w in self.workers]

    def wait(self, saga_id: str, timeout: float = 60, states: tuple[str, ...] = ()) -> Saga:
        """Wait until the saga is terminal (or in one of `states`)."""

        def settled() -> Saga | None:
            saga = self.store.load(saga_id)
            if saga is None:
                return None
            done = saga.state.value in states if states else saga.state.is_terminal
            return saga if done else None

        return wait_for(
            settled,
            timeout,
            f"saga {saga_id} to be {' or '.join(states) or 'terminal'}",
            details=lambda: f"{self.store.load(saga_id)}\n{self.logs()}",
        )

    def wait_for_step(self, saga_id: str, index: int, timeout: float = 30) -> Saga:
        """Wait until the saga's checkpoint is at step `index` or later."""

        def at_step() -> Saga | None:
            saga = self.store.load(saga_id)
            return saga if saga is not None and saga.current_step_index >= index else None

        return wait_for(at_step, timeout, f"{saga_id} to reach step {index}", details=self.logs)

    def logs(self) -> str:
        return "\n---\n".join(w.log_tail(40) for w in self.workers)

    def wait_all(self, saga_ids: list[str], timeout: float = 180) -> dict[str, Saga]:
        """Wait until every saga is terminal; returns them by id."""
        wanted = set(saga_ids)
        found: dict[str, Saga] = {}

        def all_terminal() -> bool:
            for saga_id in wanted - found.keys():
                saga = self.store.load(saga_id)
                if saga is not None and saga.state.is_terminal:
                    found[saga_id] = saga
            return found.keys() == wanted

        wait_for(
            all_terminal,
            timeout,
            f"{len(wanted)} sagas to be terminal",
            interval=0.25,
            details=lambda: f"not terminal: {sorted(wanted - found.keys())[:5]}",
        )
        return found

    def events(self, saga_id: str) -> list[str]:
        return [row["event_type"] for row in self.store.audit_trail(saga_id)]

    def assert_chain_ok(self, saga_id: str) -> None:
        assert verify_chain(self.store.audit_trail(saga_id)) == []

    def example_row(self, saga_id: str) -> dict[str, Any] | None:
        with self.store.engine.connect() as conn:
            row = (
                conn.execute(
                    select(example_backtests).where(example_backtests.c.saga_id == saga_id)
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row)


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A running saga worker (prefork, 2 processes) plus a remote-service worker.

    "postgres" and "sqlite" run on Redis; "rabbitmq" is PostgreSQL on RabbitMQ (select it with
    `pytest.mark.parametrize("stack", ["rabbitmq"], indirect=True)`).
    """
    backend = request.param
    broker_url: str = request.getfixturevalue("amqp_url" if backend == "rabbitmq" else "broker_url")
    folder = tmp_path_factory.mktemp(f"stack-{backend}")
    if backend in ("postgres", "rabbitmq"):
        database_url = fresh_postgres_database(request.getfixturevalue("pg_admin_url"))
    else:
        database_url = fresh_sqlite_database(folder)
    tag = uuid.uuid4().hex[:8]
    queue, remote_queue = f"it-{backend}-{tag}", f"it-remote-{backend}-{tag}"
    # The workers connect as the run-time role; the test process (store) as the owner.
    worker_database_url = database_url if backend == "sqlite" else runtime_role_url(database_url)
    env = {
        "SAGA_DATABASE_URL": worker_database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": WORKER_IMPORTS,
        "SAGA_HOME": str(folder),
        "IT_REMOTE_QUEUE": remote_queue,
        "IT_REMOTE_BROKER_URL": broker_url,
    }
    # The test process imports the fixture sagas too (for the definitions), with the same queue.
    os.environ["IT_REMOTE_QUEUE"] = remote_queue
    producer = Celery("it-producer", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    store = SagaStore(create_db_engine(database_url), Redactor([]))
    result = Stack(backend, database_url, broker_url, queue, remote_queue, store, producer)
    try:
        result.workers.append(start_worker("saga_worker.app", env, queue, folder / "worker.log"))
        result.workers.append(
            start_worker(
                "tests.fixtures.remote_service",
                env,
                remote_queue,
                folder / "remote.log",
                concurrency=1,
            )
        )
        yield result
    finally:
        for worker in result.workers:
            worker.stop()
        producer.close()
        store.engine.dispose()
