"""The systems under test: how each is started, fed, measured and stopped.

Each repetition starts a system's processes, warms it up, runs one burst and one serial
series, and stops it again, so no idle worker of one system runs while another is measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from celery import Celery, chain

from .common import (
    CpuMeter,
    DoneList,
    PgProbe,
    as_json,
    package_shim,
    percentile,
    redis_client,
    run_burst,
    run_serial,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    """Sizes of one repetition."""

    n: int
    serial: int
    warmup: int

    @property
    def burst_timeout(self) -> float:
        return 120 + self.n / 5  # a stuck run fails instead of hanging the whole benchmark


@dataclass
class Context:
    """What every system needs: servers, folders, and where saga_worker's source is."""

    admin_url: str  # postgresql+psycopg://.../postgres
    redis_url: str
    work_dir: Path  # logs and timing files of this run
    saga_src: Path | None = None  # a scratch checkout to benchmark instead of the installed one

    def db_url(self, name: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def pythonpath(self) -> str:
        """saga_worker from `saga_src` when given, everything else (bench) from this repo."""
        if self.saga_src is None:
            return str(REPO)
        # A folder holding only a link to the checkout's package: putting the checkout
        # itself first would also take its (possibly older) bench/ package.
        shim = package_shim(self.saga_src, self.work_dir / "saga-src")
        return os.pathsep.join([str(shim), str(REPO)])


class Process:
    """A child process group with its log; `stop` sends SIGTERM to the whole group."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.popen.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} not ready within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def _celery_worker(
    ctx: Context,
    app: str,
    queue: str,
    name: str,
    env: dict[str, str],
    ready_key: str,
    extra_args: tuple[str, ...] = (),
) -> Process:
    """`celery worker --pool prefork --concurrency 2`, ready when it pushed `ready_key`."""
    redis = redis_client(ctx.redis_url)
    redis.delete(ready_key)
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": ctx.pythonpath(),
        "BENCH_REDIS_URL": ctx.redis_url,
        "BENCH_READY_KEY": ready_key,
    }
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queue,
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--loglevel",
        "WARNING",
        "--without-mingle",
        "--without-gossip",
        "-n",
        f"{name}-{uuid.uuid4().hex[:6]}@%h",
        *extra_args,
    ]
    # cwd is the work dir, not the repository: `python -m` puts the cwd first on sys.path,
    # which would shadow a --saga-src checkout named in PYTHONPATH.
    process = Process(args, full_env, ctx.work_dir / f"{name}.log", ctx.work_dir)
    process.wait_until(lambda: redis.llen(ready_key) > 0, f"{name} worker")
    return process


class SagaWorker:
    """saga_worker: `saga.start` by send_task, three local steps, prefork with 2 children."""

    name = "saga_worker"
    queue = "bench-saga"
    worker_args: tuple[str, ...] = ()
    imports = "bench.sagas"  # SAGA_IMPORTS: bench/load.py adds its wait saga

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.url = ctx.db_url("bench_saga")
        self.timing_dir = ctx.work_dir / "saga-timings"
        self.timing_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = _free_port()
        self.process: Process | None = None

    def start(self) -> None:
        env = {
            "SAGA_DATABASE_URL": self.url,
            "SAGA_BROKER_URL": self.ctx.redis_url,
            "SAGA_QUEUE": self.queue,
            "SAGA_IMPORTS": self.imports,
            # Required with PostgreSQL (a checkout from before 0.2 ignores it).
            "SAGA_SIGNING_KEY": "saga-worker-benchmark-signing-key-0001",
            "SAGA_HOME": str(self.ctx.work_dir / "saga-home"),
            "SAGA_METRICS_PORT": str(self.metrics_port),
            "BENCH_TIMING_DIR": str(self.timing_dir),
            "BENCH_DONE_KEY": "bench:done:saga_worker",
        }
        self.process = _celery_worker(
            self.ctx,
            "saga_worker.app",
            self.queue,
            self.name,
            env,
            "bench:ready:saga",
            self.worker_args,
        )

    def measure(self, plan: Plan, tag: str) -> dict[str, Any]:
        producer = Celery("bench-producer", broker=self.ctx.redis_url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])

        def send(saga_id: str) -> None:
            producer.send_task(
                "saga.start",
                kwargs={"saga_type": "bench_saga", "context": {"n": 1}, "saga_id": saga_id},
                queue=self.queue,
            )

        try:
            result = _measure(self.ctx, send, plan, tag, "bench:done:saga_worker", self.process)
        finally:
            producer.close()
        burst_window, serial_window = result["burst"]["window"], result["serial"]["window"]
        result["commit_burst"] = self.commit_stats(*burst_window)
        result["commit_serial"] = self.commit_stats(*serial_window)
        return result

    def commit_stats(self, since: float, until: float) -> dict[str, Any]:
        """Checkpoint+audit commit latency in the worker children within a time window."""
        every: list[float] = []
        steps: list[float] = []
        for path in self.timing_dir.glob("commit-*.txt"):
            for line in path.read_text().splitlines():
                stamp, seconds, kind, _rows = line.split()
                if since <= float(stamp) <= until + 0.05:
                    every.append(float(seconds) * 1000)
                    if kind == "step":
                        steps.append(float(seconds) * 1000)
        return {
            "transitions": len(every),
            "p50_ms": percentile(every, 50),
            "p99_ms": percentile(every, 99),
            "max_ms": max(every, default=float("nan")),
            "step_p50_ms": percentile(steps, 50),
            "step_p99_ms": percentile(steps, 99),
        }

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class SagaWorkerWithEvents(SagaWorker):
    """saga_worker with Celery task events on (`worker -E`): its cost while Flower watches."""

    name = "saga_worker_events"
    worker_args = ("-E",)


class CeleryChain:
    """The ceiling: chain(reserve, compute, record) on the same broker, no database."""

    name = "celery_chain"
    queue = "bench-chain"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.process: Process | None = None

    def start(self) -> None:
        env = {"BENCH_CHAIN_QUEUE": self.queue, "BENCH_DONE_KEY": "bench:done:celery_chain"}
        self.process = _celery_worker(
            self.ctx, "bench.chain_app", self.queue, "celery_chain", env, "bench:ready:chain"
        )

    def measure(self, plan: Plan, tag: str) -> dict[str, Any]:
        producer = Celery("bench-producer", broker=self.ctx.redis_url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        q = self.queue

        def send(unit_id: str) -> None:
            chain(
                producer.signature("bench.chain.reserve", args=(unit_id, 1), queue=q),
                producer.signature("bench.chain.compute", queue=q),
                producer.signature("bench.chain.record", queue=q),
            ).apply_async()

        try:
            return _measure(self.ctx, send, plan, tag, "bench:done:celery_chain", self.process)
        finally:
            producer.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class DbosStart:
    """DBOS, workflows started in-process with DBOS.start_workflow (one process)."""

    name = "dbos_start"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.url = ctx.db_url("bench_dbos")

    def start(self) -> None:
        pass  # the runner process below is the DBOS application

    def measure(self, plan: Plan, tag: str) -> dict[str, Any]:
        out = self.ctx.work_dir / f"dbos-start-{tag}.json"
        env = {
            **os.environ,
            "PYTHONPATH": self.ctx.pythonpath(),
            "BENCH_REDIS_URL": self.ctx.redis_url,
            "BENCH_DONE_KEY": "bench:done:dbos_start",
        }
        args = [sys.executable, "-m", "bench.dbos_app", "start", "--url", _libpq(self.url)]
        args += ["--tag", tag, "--n", str(plan.n), "--serial", str(plan.serial)]
        args += ["--warmup", str(plan.warmup), "--out", str(out)]
        process = Process(args, env, self.ctx.work_dir / "dbos_start.log", REPO)
        try:
            code = process.popen.wait(timeout=plan.burst_timeout + 120)
        except subprocess.TimeoutExpired:
            process.stop()
            raise RuntimeError(f"DBOS start runner timed out:\n{process.tail()}") from None
        if code != 0 or not out.exists():
            raise RuntimeError(f"DBOS start runner exited with {code}:\n{process.tail()}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def stop(self) -> None:
        pass


class DbosQueue:
    """DBOS, a queue served by one DBOS worker process and fed by this (client) process."""

    name = "dbos_queue"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.url = ctx.db_url("bench_dbos")
        self.process: Process | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": self.ctx.pythonpath(),
            "BENCH_REDIS_URL": self.ctx.redis_url,
            "BENCH_DONE_KEY": "bench:done:dbos_queue",
        }
        log_path = self.ctx.work_dir / "dbos_queue.log"
        args = [sys.executable, "-m", "bench.dbos_app", "worker", "--url", _libpq(self.url)]
        process = Process(args, env, log_path, REPO)
        process.wait_until(
            lambda: b"dbos queue worker ready" in log_path.read_bytes(), "DBOS queue worker"
        )
        self.process = process

    def measure(self, plan: Plan, tag: str) -> dict[str, Any]:
        from dbos import DBOSClient, EnqueueOptions

        from .dbos_app import APP_NAME, QUEUE, WORKFLOW

        client = DBOSClient(system_database_url=_libpq(self.url), application_name=APP_NAME)

        def send(unit_id: str) -> None:
            options: EnqueueOptions = {
                "workflow_name": WORKFLOW,
                "queue_name": QUEUE,
                "workflow_id": unit_id,
            }
            client.enqueue(options, unit_id, 1)

        try:
            return _measure(self.ctx, send, plan, tag, "bench:done:dbos_queue", self.process)
        finally:
            client.destroy()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def _measure(
    ctx: Context,
    send: Callable[[str], Any],
    plan: Plan,
    tag: str,
    done_key: str,
    process: Process | None,
) -> dict[str, Any]:
    done = DoneList(redis_client(ctx.redis_url), done_key)
    probe = PgProbe(ctx.admin_url)
    cpu = CpuMeter({process.popen.pid} if process else set())
    try:
        ids = [f"{tag}-w{i}" for i in range(plan.warmup)]
        run_burst(send, ids, done, probe, plan.burst_timeout)
        burst = run_burst(
            send, [f"{tag}-b{i}" for i in range(plan.n)], done, probe, plan.burst_timeout, cpu
        )
        serial = run_serial(send, [f"{tag}-s{i}" for i in range(plan.serial)], done, 60)
    finally:
        probe.close()
    return {"burst": as_json(burst), "serial": as_json(serial)}


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class System(Protocol):
    """What bench/main.py runs: start, measure a plan, stop."""

    def start(self) -> None: ...

    def measure(self, plan: Plan, tag: str) -> dict[str, Any]: ...

    def stop(self) -> None: ...


SYSTEMS: dict[str, Callable[[Context], System]] = {
    "saga_worker": SagaWorker,
    "saga_worker_events": SagaWorkerWithEvents,
    "celery_chain": CeleryChain,
    "dbos_start": DbosStart,
    "dbos_queue": DbosQueue,
}
