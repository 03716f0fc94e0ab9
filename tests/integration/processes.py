"""Process control for the recovery and chaos tests: beats, worker kills, server restarts.

Restarting a server needs what scripts/test.sh exports about the servers it started
(SAGA_TEST_PG_BIN/_DATA/_USER/_PORT, SAGA_TEST_REDIS_PORT/_SERVER). Without them the tests
that restart servers fail in CI and skip elsewhere: never restart a server they did not start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import make_url

from saga_worker.audit.redaction import Redactor
from saga_worker.core.model import Saga
from saga_worker.store.codec import saga_from_row
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs, checkpoints
from tests.requirements import unavailable
from tests.waiting import read_logs, unfinished_tasks, wait_for, wait_for_tasks

from .conftest import WorkerProcess, start_worker

REPO = Path(__file__).resolve().parents[2]
RIG_IMPORTS = "saga_worker.examples,tests.fixtures.recovery_sagas"


@dataclass
class BeatProcess:
    """A `celery beat` subprocess with its own schedule file and log."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def sent(self) -> int:
        """How many saga.recover messages this beat has sent so far."""
        return count_lines([self.log_path], "Sending due task saga-recover")

    def stop(self, timeout: float = 20) -> None:
        stop_group(self.process, timeout=timeout)


def start_beat(env: dict[str, str], folder: Path, name: str) -> BeatProcess:
    """Start `celery -A saga_worker.app beat` and wait until it sent its first saga.recover."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "saga_worker.app",
            "beat",
            "--schedule",
            str(folder / f"{name}-schedule"),
            "--pidfile",
            "",
            "--loglevel",
            "INFO",
        ],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=folder,
        start_new_session=True,
    )
    log_file.close()  # the child has its own descriptor
    beat = BeatProcess(process, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"beat exited with {process.returncode}:\n{tail(log_path)}")
        if beat.sent() > 0:
            return beat
        time.sleep(0.1)
    beat.stop()
    raise RuntimeError(f"beat sent nothing within 60 s:\n{tail(log_path)}")


def stop_group(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker's main process and its pool children at once (a crashed host)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (a prefork worker's pool children), from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def count_lines(paths: Iterable[Path], needle: str) -> int:
    total = 0
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        total += sum(1 for line in text.splitlines() if needle in line)
    return total


def lines_with(paths: Iterable[Path], needle: str) -> list[str]:
    found: list[str] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        found.extend(line for line in text.splitlines() if needle in line)
    return found


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


# -- servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    """The PostgreSQL and Redis that scripts/test.sh started, which a test may restart."""

    pg_bin: str
    pg_data: str
    pg_user: str
    pg_port: int
    redis_port: int
    redis_server: str

    def restart_postgres(self) -> float:
        """`pg_ctl restart -m fast` (drops every connection); returns the seconds it took."""
        command = [
            f"{self.pg_bin}/pg_ctl",
            "restart",
            "-D",
            self.pg_data,
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "-l",
            "/dev/null",
        ]
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: act as the user that owns the data directory.
            command = ["runuser", "-u", self.pg_user, "--", *command]
        began = time.monotonic()
        subprocess.run(command, check=True, cwd=tempfile.gettempdir(), capture_output=True)
        return time.monotonic() - began

    def restart_redis(self) -> float:
        """Shut Redis down without saving and start a new one on the same port (queues empty).

        scripts/test.sh started the server with --save '' --appendonly no, so nothing survives.
        The new server outlives the test (the rest of the session uses it); it is shut down when
        the test process exits.
        """
        began = time.monotonic()
        # A bare socket: redis-py's client retries the command on the connection the server
        # closes as it exits, which costs seconds.
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=10) as sock:
            sock.sendall(b"SHUTDOWN NOSAVE\r\n")
            with contextlib.suppress(OSError):
                while sock.recv(1024):
                    pass
        _wait_port(self.redis_port, open_=False)
        folder = Path(tempfile.mkdtemp(prefix="saga-redis-restarted-"))
        log_file = (folder / "redis.log").open("wb")
        process = subprocess.Popen(
            [
                self.redis_server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()  # the child has its own descriptor
        _started_redis.append(process)
        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis(host="127.0.0.1", port=self.redis_port).ping():
                    break
            except redis.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"restarted Redis did not come up: {tail(folder / 'redis.log')}")
            time.sleep(0.05)
        return time.monotonic() - began


_started_redis: list[subprocess.Popen[bytes]] = []


@atexit.register
def _stop_started_redis() -> None:
    for process in _started_redis:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_port(port: int, *, open_: bool, timeout: float = 30) -> None:
    def in_state() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return (sock.connect_ex(("127.0.0.1", port)) == 0) == open_

    wait_for(in_state, timeout, f"port {port} to be {'open' if open_ else 'closed'}")


def restartable_servers() -> Servers:
    """The servers scripts/test.sh started; fails in CI and skips elsewhere when unknown."""
    names = [
        "SAGA_TEST_PG_BIN",
        "SAGA_TEST_PG_DATA",
        "SAGA_TEST_PG_USER",
        "SAGA_TEST_PG_PORT",
        "SAGA_TEST_REDIS_PORT",
        "SAGA_TEST_REDIS_SERVER",
    ]
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        unavailable(
            f"{', '.join(missing)} not set: this test restarts PostgreSQL and Redis, so it needs "
            "the servers scripts/test.sh starts (bash scripts/test.sh tests/integration/...)"
        )
    env = os.environ
    # Only ever restart the servers the tests talk to.
    for url_name, port_name in (
        ("SAGA_TEST_DATABASE_URL", "SAGA_TEST_PG_PORT"),
        ("SAGA_TEST_BROKER_URL", "SAGA_TEST_REDIS_PORT"),
    ):
        url = make_url(env.get(url_name, ""))
        if url.port != int(env[port_name]) or url.host not in ("127.0.0.1", "localhost"):
            pytest.fail(f"{url_name} is not the local server on {port_name}={env[port_name]}")
    return Servers(
        pg_bin=env["SAGA_TEST_PG_BIN"],
        pg_data=env["SAGA_TEST_PG_DATA"],
        pg_user=env["SAGA_TEST_PG_USER"],
        pg_port=int(env["SAGA_TEST_PG_PORT"]),
        redis_port=int(env["SAGA_TEST_REDIS_PORT"]),
        redis_server=env["SAGA_TEST_REDIS_SERVER"],
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- a test's own worker(s) and beat(s) ------------------------------------------------------


@dataclass
class Rig:
    """One test's saga workers and beats on their own queue, against a test database.

    Every worker incarnation logs to its own file (worker-1.log, worker-2.log, ...) so that
    log lines of killed workers can still be counted.
    """

    folder: Path
    env: dict[str, str]
    queue: str
    store: SagaStore
    producer: Celery
    workers: list[WorkerProcess] = field(default_factory=list)
    beats: list[BeatProcess] = field(default_factory=list)

    @classmethod
    def create(cls, database_url: str, broker_url: str, folder: Path, **settings: str) -> Rig:
        """A rig whose processes get SAGA_* `settings` (e.g. SAGA_STALL_GRACE_SECONDS="1")."""
        folder.mkdir(parents=True, exist_ok=True)
        queue = unique("rec")
        env = {
            "SAGA_DATABASE_URL": database_url,
            "SAGA_BROKER_URL": broker_url,
            "SAGA_QUEUE": queue,
            "SAGA_IMPORTS": RIG_IMPORTS,
            "SAGA_HOME": str(folder),
            **settings,
        }
        producer = Celery("rec-producer", broker=broker_url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        store = SagaStore(create_db_engine(database_url), Redactor([]))
        return cls(folder, env, queue, store, producer)

    @property
    def worker(self) -> WorkerProcess:
        """The current (last started) worker."""
        return self.workers[-1]

    def start_worker(self, concurrency: int = 2) -> WorkerProcess:
        log_path = self.folder / f"worker-{len(self.workers) + 1}.log"
        worker = start_worker(
            "saga_worker.app", self.env, self.queue, log_path, concurrency=concurrency
        )
        self.workers.append(worker)
        return worker

    def start_beat(self) -> BeatProcess:
        beat = start_beat(self.env, self.folder, f"beat-{len(self.beats) + 1}")
        self.beats.append(beat)
        return beat

    def start_saga(self, saga_type: str, context: dict[str, Any], saga_id: str) -> str:
        """Start a saga as an outside producer does: send_task by name."""
        self.producer.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": context, "saga_id": saga_id},
            queue=self.queue,
        )
        return saga_id

    def worker_logs(self) -> list[Path]:
        return [w.log_path for w in self.workers]

    def settle(self, timeout: float = 30) -> None:
        """Wait until the current worker has run everything sent to the queue before now.

        A saga.recover sent now comes after every message already queued (the queue is
        FIFO): once it has run and every task the worker received has ended, a message sent
        earlier has had its effect, and counts of what the worker did are final."""
        sentinel = uuid.uuid4().hex
        self.producer.send_task("saga.recover", queue=self.queue, task_id=sentinel)
        log = self.worker.log_path
        wait_for_tasks(log, [sentinel], timeout)
        wait_for(
            lambda: not unfinished_tasks(read_logs(log)),
            timeout,
            "every task the worker received to end",
            details=lambda: f"{sorted(unfinished_tasks(read_logs(log)))}\n{tail(log)}",
        )

    def wait_all(self, saga_ids: Iterable[str], timeout: float) -> dict[str, Saga]:
        """Wait until every saga is terminal; fail with the stragglers and the logs' tails."""
        waiting = set(saga_ids)
        found: dict[str, Saga] = {}

        def all_terminal() -> bool:
            for saga in self.load_many(waiting):
                if saga.state.is_terminal:
                    found[saga.saga_id] = saga
                    waiting.discard(saga.saga_id)
            return not waiting

        def stragglers() -> str:
            stuck = [self.store.load(s) for s in sorted(waiting)[:3]]
            logs = "\n---\n".join(tail(p, 30) for p in self.worker_logs()[-1:])
            return f"{len(waiting)} not terminal, e.g. {stuck}\n{logs}"

        wait_for(
            all_terminal, timeout, "every saga to be terminal", interval=0.25, details=stragglers
        )
        return found

    def load_many(self, saga_ids: Iterable[str]) -> list[Saga]:
        ids = list(saga_ids)
        sagas: list[Saga] = []
        with self.store.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(checkpoints).where(checkpoints.c.saga_id.in_(ids[start : start + 500]))
                ).mappings()
                sagas.extend(saga_from_row(r) for r in rows)
        return sagas

    def audit_rows(self, saga_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Audit rows of the given sagas, each saga's in insertion order."""
        ids = list(saga_ids)
        trails: dict[str, list[dict[str, Any]]] = {s: [] for s in ids}
        with self.store.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    select(audit_logs)
                    .where(audit_logs.c.saga_id.in_(ids[start : start + 500]))
                    .order_by(audit_logs.c.id)
                ).mappings()
                for row in rows:
                    trails[row["saga_id"]].append(dict(row))
        return trails

    def close(self) -> None:
        for beat in self.beats:
            beat.stop()
        for worker in self.workers:
            worker.stop()
        self.producer.close()
        self.store.engine.dispose()
