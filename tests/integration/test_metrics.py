"""Metrics end to end: a known workload on a real prefork worker whose children are recycled,
scraped over HTTP (exact counters), through a real Prometheus, and watched by Flower.

The pure tests at the top check the hook and the file compaction without any server.
"""

from __future__ import annotations

import base64
import glob
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from saga_worker.audit.redaction import Redactor
from saga_worker.core.decision import Decision
from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.events import StartRequested, StepFailed, StepSucceeded
from saga_worker.core.model import Direction, SagaState
from saga_worker.core.retry import RetryPolicy
from saga_worker.core.transition import start, transition
from saga_worker.engine import TransitionRecord
from saga_worker.metrics.gauges import SagaStateCollector
from saga_worker.metrics.hooks import METRIC_NAMES, MetricsHook, SagaMetrics
from saga_worker.metrics.multiprocess import MultiProcessCollector, compact, enable_multiprocess
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs
from tests import waiting
from tests.requirements import require_binary

from .conftest import (
    REPO,
    WorkerProcess,
    fresh_postgres_database,
    fresh_sqlite_database,
    start_worker,
)

DEPLOY = REPO / "deploy"
SAGA = "backtest_workflow"
FLOWER_AUTH = "ops:s3cret-for-tests"

# -- pure: the hook ---------------------------------------------------------------------------


def _noop(_: Any) -> dict[str, Any]:
    return {}


def _two_steps() -> SagaDefinition:
    policy = RetryPolicy(max_attempts=2, initial_delay_seconds=0.1)
    return SagaDefinition(
        "hooked",
        [
            Step("a", _noop, compensate=_noop, retry=policy, timeout_seconds=5),
            Step("b", _noop, retry=policy, timeout_seconds=5),
        ],
    )


def test_hook_maps_transitions_to_design_metrics() -> None:
    """A saga whose step b fails twice: counters, labels and histograms as documented."""
    definition = _two_steps()
    registry = CollectorRegistry()
    m = SagaMetrics(registry)
    hook = MetricsHook(m)
    now = datetime.now(UTC)
    decision = start(definition, StartRequested("h-1", "hooked", {}), now)
    hook.on_transition(TransitionRecord(definition, None, decision, 0.004, False))

    def step(decision: Decision, event: Any) -> Decision:
        after = transition(definition, decision.saga, event, now)
        hook.on_transition(TransitionRecord(definition, decision.saga, after, 0.002, True))
        return after

    fwd, back = Direction.FORWARD, Direction.COMPENSATE
    decision = step(decision, StepSucceeded(0, fwd, 1, {}, 12.0))
    decision = step(decision, StepFailed(1, fwd, 1, "IOError", "x", duration_ms=30.0))
    decision = step(decision, StepFailed(1, fwd, 2, "IOError", "x", duration_ms=40.0))
    decision = step(decision, StepFailed(0, back, 1, "KeyError", "y", duration_ms=5.0))
    decision = step(decision, StepFailed(0, back, 2, "KeyError", "y", duration_ms=5.0))
    assert decision.saga.state.value == "FAILED"
    step(decision, StepSucceeded(0, back, 1, {}, 1.0))  # late: ignored, only a load

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    t = {"saga_type": "hooked"}
    assert value("saga_started_total", **t) == 1
    assert value("saga_failed_total", **t, failure_reason="compensation_failed") == 1
    assert value("saga_completed_total", **t) is None
    assert value("saga_step_executed_total", **t, step_name="a") == 1
    assert value("saga_step_executed_total", **t, step_name="b") == 2
    assert value("saga_step_retry_total", **t, step_name="b") == 1
    assert value("saga_step_failed_total", **t, step_name="b", error_type="IOError") == 1
    assert value("saga_compensation_executed_total", **t, step_name="a") == 2
    assert value("saga_compensation_failed_total", **t, step_name="a", error_type="KeyError") == 1
    assert value("saga_checkpoint_saved_total", **t) == 6
    assert value("saga_checkpoint_loaded_total", **t) == 6
    assert value("saga_checkpoint_save_duration_seconds_count", **t) == 6
    assert value("saga_audit_log_written_total", **t, event_type="step_start") == 3
    assert value("saga_audit_log_written_total", **t, event_type="compensation_retry") == 1
    assert value("saga_audit_log_write_duration_seconds_count", event_type="saga_failed") == 1
    sd = "saga_step_duration_seconds"
    assert value(f"{sd}_count", **t, step_name="b", status="retried") == 1
    assert value(f"{sd}_count", **t, step_name="b", status="failed") == 1
    assert value(f"{sd}_sum", **t, step_name="b", status="failed") == pytest.approx(0.04)
    assert value("saga_duration_seconds_count", **t, status="failed") == 1


def test_state_gauges_come_from_the_checkpoint_table(tmp_path: Path) -> None:
    """RUNNING/COMPENSATING, FAILED and overdue sagas counted per type at scrape time."""
    url = fresh_sqlite_database(tmp_path)
    store = SagaStore(create_db_engine(url), Redactor([]))
    definition = _two_steps()
    now = datetime.now(UTC)
    for saga_id, began in (("g-1", now), ("g-2", now - timedelta(hours=1)), ("g-3", now)):
        decision = start(definition, StartRequested(saga_id, "hooked", {}), began)
        if saga_id == "g-3":
            failed = replace(decision.saga, state=SagaState.FAILED, attempts=())
            decision = replace(decision, saga=failed)
        assert store.create(decision, began)
    store.engine.dispose()
    registry = CollectorRegistry()
    registry.register(SagaStateCollector(url))
    t = {"saga_type": "hooked"}
    assert registry.get_sample_value("saga_running_current", t) == 2
    assert registry.get_sample_value("saga_stalled_current", t) == 1  # g-2's deadline passed
    assert registry.get_sample_value("saga_failed_current", t) == 1
    broken = CollectorRegistry()
    broken.register(SagaStateCollector(f"sqlite:///{tmp_path}/missing/x.db"))
    assert broken.get_sample_value("saga_running_current", t) is None  # left out, not stale


# -- pure: compaction of dead processes' files -----------------------------------------------


def _count_in_child(directory: str, amount: int, counted: Any = None, hold: Any = None) -> None:
    enable_multiprocess(directory)
    m = SagaMetrics()
    for _ in range(amount):
        m.started.labels("compacted").inc()
        m.checkpoint_save_duration.labels("compacted").observe(0.003)
    if counted is not None:
        counted.set()
    if hold is not None:
        hold.wait(30)


def _totals(directory: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    files = glob.glob(os.path.join(directory, "*.db"))
    merged = MultiProcessCollector.merge(files, accumulate=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in merged for s in m.samples}


def test_compaction_keeps_totals_exact(tmp_path: Path) -> None:
    """Files of exited processes fold into the archive; a live process's file stays."""
    ctx = multiprocessing.get_context("fork")
    directory = str(tmp_path)
    counted, hold = ctx.Event(), ctx.Event()
    live = ctx.Process(target=_count_in_child, args=(directory, 1, counted, hold))
    live.start()
    for amount in (2, 3, 4):
        child = ctx.Process(target=_count_in_child, args=(directory, amount))
        child.start()
        child.join()
        assert child.exitcode == 0
    assert counted.wait(30), "the live process never counted"
    assert len(glob.glob(f"{directory}/counter_*.db")) == 4
    before = _totals(directory)
    assert before[("saga_started_total", (("saga_type", "compacted"),))] == 10
    assert compact(directory) == 6  # 3 dead processes x (counter, histogram)
    assert _totals(directory) == pytest.approx(before)  # float sums may round differently
    left = sorted(os.path.basename(f) for f in glob.glob(f"{directory}/*.db"))
    assert [f for f in left if "archive" in f] == ["counter_archive.db", "histogram_archive.db"]
    assert len(left) == 4  # the archives and the live process's two files
    child = ctx.Process(target=_count_in_child, args=(directory, 5))
    child.start()
    child.join()
    hold.set()
    live.join()
    assert child.exitcode == 0 and live.exitcode == 0
    assert compact(directory) == 4
    after = _totals(directory)
    assert after[("saga_started_total", (("saga_type", "compacted"),))] == 15
    count = ("saga_checkpoint_save_duration_seconds_count", (("saga_type", "compacted"),))
    assert after[count] == 15
    assert sorted(os.path.basename(f) for f in glob.glob(f"{directory}/*.db")) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]


# -- services ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, auth: str | None = None, timeout: float = 5) -> bytes:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_for(what: str, probe: Callable[[], Any], timeout: float, logs: Callable[[], str]) -> Any:
    """Poll `probe` until it returns something truthy without raising (a server that is still
    starting raises)."""
    return waiting.wait_for(probe, timeout, what, interval=0.2, details=logs, ignore=(Exception,))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@dataclass
class Service:
    """A server subprocess started by a test, with its log."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "<no log>"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> Service:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    return Service(process, log_path)


@dataclass
class Observed:
    """The workload's stack: worker, beat and Flower on a fresh database and queue."""

    tag: str
    database_url: str
    queue: str
    folder: Path
    store: SagaStore
    worker: WorkerProcess
    metrics_port: int
    beat_port: int
    flower_port: int
    services: list[Service] = field(default_factory=list)
    saga_ids: dict[str, str] = field(default_factory=dict)
    final: Samples = field(default_factory=dict)
    running_mid_flight: float | None = None

    def logs(self) -> str:
        parts = [f"--- worker\n{self.worker.log_tail(60)}"]
        parts += [f"--- {s.log_path.name}\n{s.log_tail(30)}" for s in self.services]
        return "\n".join(parts)


# What the workload must produce, worked out by hand from docs/contract.md (states, events)
# (3 attempts per step and compensation):
#   3 x complete; 2 x fail_step run_strategy; 1 x flaky save_results (1 failure);
#   1 x fail_step save_results + fail_compensation create_backtest (ends FAILED);
#   1 x aborted while create_backtest runs; a duplicate start; an abort of a finished saga.
AUDIT_ROWS = {
    "saga_start": 8,
    "step_start": 27,
    "step_complete": 17,
    "step_retry": 7,
    "step_failed": 3,
    "compensation_start": 7,
    "compensation_complete": 4,
    "compensation_retry": 2,
    "compensation_failed": 1,
    "saga_complete": 4,
    "saga_compensated": 2,
    "saga_failed": 1,
    "abort_requested": 1,
    "saga_aborted": 1,
}
STEP_ATTEMPTS = {  # (step, status) -> attempts
    ("create_backtest", "completed"): 8,
    ("run_strategy", "completed"): 5,
    ("run_strategy", "retried"): 4,
    ("run_strategy", "failed"): 2,
    ("save_results", "completed"): 4,
    ("save_results", "retried"): 3,
    ("save_results", "failed"): 1,
}
COMPENSATION_ATTEMPTS = {
    ("create_backtest", "completed"): 3,
    ("create_backtest", "retried"): 2,
    ("create_backtest", "failed"): 1,
    ("run_strategy", "completed"): 1,
}


def expected_counters() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every non-zero counter sample the worker must serve after the workload."""
    t = {"saga_type": SAGA}
    rows: list[tuple[str, dict[str, str], float]] = [
        ("saga_started_total", t, 8),
        ("saga_completed_total", t, 4),
        ("saga_failed_total", {**t, "failure_reason": "step_failed"}, 2),
        ("saga_failed_total", {**t, "failure_reason": "compensation_failed"}, 1),
        ("saga_aborted_total", t, 1),
        ("saga_step_executed_total", {**t, "step_name": "create_backtest"}, 8),
        ("saga_step_executed_total", {**t, "step_name": "run_strategy"}, 11),
        ("saga_step_executed_total", {**t, "step_name": "save_results"}, 8),
        ("saga_step_retry_total", {**t, "step_name": "run_strategy"}, 4),
        ("saga_step_retry_total", {**t, "step_name": "save_results"}, 3),
        (
            "saga_step_failed_total",
            {**t, "step_name": "run_strategy", "error_type": "InjectedFailure"},
            2,
        ),
        (
            "saga_step_failed_total",
            {**t, "step_name": "save_results", "error_type": "InjectedFailure"},
            1,
        ),
        ("saga_compensation_executed_total", {**t, "step_name": "create_backtest"}, 6),
        ("saga_compensation_executed_total", {**t, "step_name": "run_strategy"}, 1),
        (
            "saga_compensation_failed_total",
            {**t, "step_name": "create_backtest", "error_type": "InjectedFailure"},
            1,
        ),
        ("saga_checkpoint_saved_total", t, 43),
        # Reads only: the abort, the late abort, and the reload after the aborted saga's
        # running step met the abort's newer version. Every other step result was decided
        # on the checkpoint its message carried (worker/snapshot.py).
        ("saga_checkpoint_loaded_total", t, 3),
    ]
    rows += [
        ("saga_audit_log_written_total", {**t, "event_type": k}, v) for k, v in AUDIT_ROWS.items()
    ]
    return {(name, frozenset(labels.items())): value for name, labels, value in rows}


def run_workload(obs: Observed, producer: Celery) -> None:
    ids = obs.saga_ids

    def begin(name: str, **context: Any) -> None:
        ids[name] = f"obs-{obs.tag}-{name}"
        producer.send_task(
            "saga.start",
            kwargs={
                "saga_type": SAGA,
                "context": {"strategy_id": 7, **context},
                "saga_id": ids[name],
                "user_id": "metrics-test",
            },
            queue=obs.queue,
        )

    # The abort must land while create_backtest runs: start it alone and slow.
    begin("abort", slow_step={"step": "create_backtest", "seconds": 4})
    wait_for("the slow saga's checkpoint", lambda: obs.store.load(ids["abort"]), 30, obs.logs)
    producer.send_task(
        "saga.abort", kwargs={"saga_id": ids["abort"], "reason": "test"}, queue=obs.queue
    )
    obs.running_mid_flight = wait_for(
        "saga_running_current == 1",
        lambda: (
            sample(scrape(obs.metrics_port), "saga_running_current", saga_type=SAGA) == 1 and 1.0
        ),
        10,
        obs.logs,
    )
    wait_for(
        "abort_requested",
        lambda: "abort_requested" in [r["event_type"] for r in obs.store.audit_trail(ids["abort"])],
        30,
        obs.logs,
    )
    for i in range(3):
        begin(f"ok{i}")
    producer.send_task(  # a duplicate start, identical to the first: never a second saga
        "saga.start",
        kwargs={
            "saga_type": SAGA,
            "context": {"strategy_id": 7},
            "saga_id": ids["ok0"],
            "user_id": "metrics-test",
        },
        queue=obs.queue,
    )
    for i in range(2):
        begin(f"fail{i}", fail_step="run_strategy")
    begin("flaky", flaky_step={"step": "save_results", "failures": 1})
    begin("stuck", fail_step="save_results", fail_compensation="create_backtest")

    def all_terminal() -> bool:
        sagas = [obs.store.load(i) for i in ids.values()]
        return all(s is not None and s.state.is_terminal for s in sagas)

    wait_for("every saga terminal", all_terminal, 120, obs.logs)
    states = {name: getattr(obs.store.load(i), "state", None) for name, i in ids.items()}
    assert states == {
        "abort": "ABORTED",
        "ok0": "COMPLETED",
        "ok1": "COMPLETED",
        "ok2": "COMPLETED",
        "fail0": "COMPENSATED",
        "fail1": "COMPENSATED",
        "flaky": "COMPLETED",
        "stuck": "FAILED",
    }, obs.logs()
    # An abort of a finished saga is an ignored transition: one checkpoint read, no save.
    producer.send_task(
        "saga.abort", kwargs={"saga_id": ids["ok1"], "reason": "late"}, queue=obs.queue
    )
    loaded = ("saga_checkpoint_loaded_total", frozenset({("saga_type", SAGA)}))
    obs.final = wait_for(
        "the late abort's checkpoint load",
        lambda: (s := scrape(obs.metrics_port)).get(loaded) == 3 and s,
        30,
        obs.logs,
    )
    wait_for(
        "the duplicate start to be handled",
        lambda: f"{ids['ok0']} already exists" in obs.worker.log_path.read_text(errors="replace"),
        30,
        obs.logs,
    )
    obs.final = scrape(obs.metrics_port)


@pytest.fixture(scope="module")
def observed(
    broker_url: str, pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observed]:
    folder = tmp_path_factory.mktemp("observed")
    database_url = fresh_postgres_database(pg_admin_url)
    tag = uuid.uuid4().hex[:8]
    queue = f"it-metrics-{tag}"
    metrics_port, beat_port, flower_port = free_port(), free_port(), free_port()
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(folder),
    }
    celery = [sys.executable, "-m", "celery", "-A", "saga_worker.app"]
    services: list[Service] = []
    producer = Celery("it-metrics-producer", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    store = SagaStore(create_db_engine(database_url), Redactor([]))
    worker = None
    try:
        # Flower first: it only knows the tasks whose events it receives.
        flower = spawn(
            [*celery, "flower", f"--port={flower_port}", "--address=127.0.0.1"],
            {**env, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
            folder / "flower.log",
        )
        services.append(flower)
        beat = spawn(
            [*celery, "beat", "--loglevel=INFO", f"--schedule={folder / 'beat-schedule'}"],
            {**env, "SAGA_METRICS_PORT": str(beat_port)},
            folder / "beat.log",
        )
        services.append(beat)
        worker = start_worker(
            "saga_worker.app",
            {**env, "SAGA_METRICS_PORT": str(metrics_port)},
            queue,
            folder / "worker.log",
            concurrency=2,
            extra_args=("--max-tasks-per-child", "3"),
        )
        obs = Observed(
            tag,
            database_url,
            queue,
            folder,
            store,
            worker,
            metrics_port,
            beat_port,
            flower_port,
            services,
        )
        wait_for(
            "Flower",
            lambda: http_get(f"http://127.0.0.1:{flower_port}/healthcheck") == b"OK",
            60,
            obs.logs,
        )
        # Healthy is not enough: Flower must be receiving events before the first task runs
        # (a worker heartbeat is the proof), or it misses them for good.
        wait_for(
            "Flower to receive worker events",
            lambda: re.search(
                rb"^flower_worker_online\{[^}]*\} 1\.0$",
                http_get(f"http://127.0.0.1:{flower_port}/metrics"),
                re.MULTILINE,
            ),
            60,
            obs.logs,
        )
        # The app leaves task events off; Flower turns them on in the worker it sees.
        wait_for(
            "Flower to enable the worker's task events",
            lambda: b"Events of group {task} enabled by remote" in worker.log_path.read_bytes(),
            30,
            obs.logs,
        )
        wait_for("the beat's endpoint", lambda: scrape(beat_port), 60, obs.logs)
        began = time.monotonic()
        run_workload(obs, producer)
        print(f"workload settled in {time.monotonic() - began:.1f}s")
        yield obs
    finally:
        if worker is not None:
            worker.stop()
        for service in services:
            service.stop()
        producer.close()
        store.engine.dispose()


@pytest.mark.integration
def test_worker_serves_exact_counters(observed: Observed) -> None:
    """Exact per-label counters across recycled prefork children, and full histograms."""
    final = observed.final
    counters = {
        key: value
        for key, value in final.items()
        if key[0].endswith("_total") and value != 0 and key[0] in METRIC_NAMES
    }
    assert counters == expected_counters(), observed.logs()
    assert sample(final, "saga_recovered_total", saga_type=SAGA) == 0  # exposed from the start

    # The database agrees with the audit counters.
    with observed.store.engine.connect() as conn:
        rows = conn.execute(
            select(audit_logs.c.event_type, func.count()).group_by(audit_logs.c.event_type)
        ).all()
    assert {event_type: n for event_type, n in rows} == AUDIT_ROWS

    # Histograms: one observation per attempt, per terminal saga, per write.
    t = {"saga_type": SAGA}
    for status, n in {"completed": 4, "compensated": 2, "failed": 1, "aborted": 1}.items():
        assert sample(final, "saga_duration_seconds_count", **t, status=status) == n
        assert (sample(final, "saga_duration_seconds_sum", **t, status=status) or 0) > 0
    for (step, status), n in STEP_ATTEMPTS.items():
        labels = {**t, "step_name": step, "status": status}
        assert sample(final, "saga_step_duration_seconds_count", **labels) == n, labels
    for (step, status), n in COMPENSATION_ATTEMPTS.items():
        labels = {**t, "step_name": step, "status": status}
        assert sample(final, "saga_compensation_duration_seconds_count", **labels) == n, labels
    assert sample(final, "saga_checkpoint_save_duration_seconds_count", **t) == 43
    assert (sample(final, "saga_checkpoint_save_duration_seconds_sum", **t) or 0) > 0
    for event_type, n in AUDIT_ROWS.items():
        name = "saga_audit_log_write_duration_seconds_count"
        assert sample(final, name, event_type=event_type) == n, event_type
    slow = sample(
        final,
        "saga_step_duration_seconds_bucket",
        **t,
        step_name="create_backtest",
        status="completed",
        le="2.5",
    )
    assert slow == 7  # the aborted saga's create_backtest slept 4 s

    # Saga state gauges, from the database, on the worker and on the beat.
    assert observed.running_mid_flight == 1
    for port in (observed.metrics_port, observed.beat_port):
        served = scrape(port)
        assert sample(served, "saga_running_current", **t) == 0
        assert sample(served, "saga_failed_current", **t) == 1  # "stuck" awaits an operator
        assert sample(served, "saga_stalled_current", **t) == 0
    beat = scrape(observed.beat_port)
    assert not any(name.endswith("_total") for name, _ in beat), "the beat counts nothing"

    # Children were recycled (max-tasks-per-child 3) and their files compacted away.
    match = re.search(r"files in (\S+)\)", observed.worker.log_path.read_text(errors="replace"))
    assert match, "the worker did not log its metrics directory"
    files = sorted(os.path.basename(f) for f in glob.glob(f"{match.group(1)}/*.db"))
    assert "counter_archive.db" in files and "histogram_archive.db" in files, files
    assert len(files) <= 2 + 2 * 3, files  # archives + (2 children + main) x 2 types
    recycled = len(set(re.findall(r"ForkPoolWorker-(\d+)", observed.worker.log_tail(100000))))
    assert recycled > 4, f"only {recycled} pool children ran: max-tasks-per-child not applied?"


# -- Prometheus -------------------------------------------------------------------------------


def prometheus_config(obs: Observed) -> dict[str, Any]:
    """deploy/'s scrape configuration, pointed at this test's processes, scraping every second."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        "saga_worker": obs.metrics_port,
        "saga_beat": obs.beat_port,
        "flower": obs.flower_port,
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    config.pop("alerting", None)  # no Alertmanager here: the test reads Prometheus' alerts
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    return config


def prom_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(http_get(url))
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.integration
def test_prometheus_scrapes_the_worker(observed: Observed, tmp_path: Path) -> None:
    """A real Prometheus with deploy/'s config and rules reads the counters back."""
    binary = require_binary("prometheus")
    port = free_port()
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(observed)))
    server = spawn(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        {},
        tmp_path / "prometheus.log",
    )
    try:
        logs = server.log_tail

        def started() -> bool:
            result = prom_query(port, 'sum(saga_started_total{job="saga_worker"})')
            return bool(result) and float(result[0]["value"][1]) == 8

        wait_for("saga_started_total through Prometheus", started, 60, logs)
        by_event = {
            r["metric"]["event_type"]: float(r["value"][1])
            for r in prom_query(
                port, 'sum by (event_type) (saga_audit_log_written_total{job="saga_worker"})'
            )
        }
        assert by_event == AUDIT_ROWS
        failed = prom_query(port, "sum by (failure_reason) (saga_failed_total)")
        assert {r["metric"]["failure_reason"]: float(r["value"][1]) for r in failed} == {
            "step_failed": 2,
            "compensation_failed": 1,
        }
        wait_for(
            "every job up",
            lambda: (
                {r["metric"]["job"]: r["value"][1] for r in prom_query(port, "up")}
                == {"saga_worker": "1", "saga_beat": "1", "flower": "1"}
            ),
            30,
            logs,
        )
        # The real saga left FAILED and its failed compensation trip the real rules.
        wait_for(
            "alerts on the FAILED saga",
            lambda: (
                {"SagasAwaitingOperator", "SagaCompensationFailed"}
                <= {
                    a["labels"]["alertname"]
                    for a in json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/alerts"))["data"][
                        "alerts"
                    ]
                }
            ),
            30,
            logs,
        )
        # Every Grafana panel query is valid PromQL and returns data from this worker
        # (rate() needs two samples in its window).
        wait_for(
            "three scrapes",
            lambda: prom_query(port, "count_over_time(saga_started_total[1m]) >= 3"),
            30,
            logs,
        )
        for panel_title, expr in dashboard_queries():
            query = expr.replace("$saga_type", ".*").replace("$__rate_interval", "1m")
            for name, default in dashboard_job_defaults().items():
                query = query.replace(f"${name}", default)
            result = prom_query(port, query)
            if "histogram_quantile" not in expr:  # NaN once the workload is over
                assert result, f"{panel_title}: {query} returned nothing"
    finally:
        server.stop()


def dashboard_job_defaults() -> dict[str, str]:
    """The dashboard's job variables and their defaults (deploy/'s scrape job names)."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "saga_worker.json").read_text())
    return {
        v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "textbox"
    }


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "saga_worker.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


# -- Flower -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_flower_shows_steps_by_name(observed: Observed) -> None:
    """Flower's API (basic auth) lists our step and compensation tasks by name and state."""
    base = f"http://127.0.0.1:{observed.flower_port}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_get(f"{base}/api/tasks")
    assert refused.value.code == 401
    ours = f"obs-{observed.tag}-"
    prefix = f"saga.{SAGA}."

    def seen() -> Tally[tuple[str, str]]:
        tasks = json.loads(http_get(f"{base}/api/tasks?limit=100000", auth=FLOWER_AUTH))
        return Tally(
            (t["name"], t["state"])
            for t in tasks.values()
            if ours in str(t.get("kwargs")) and str(t.get("name")).startswith(prefix)
        )

    # Each attempt as the engine saw it (STEP_ATTEMPTS, COMPENSATION_ATTEMPTS): one that failed
    # with another attempt to follow is RETRY, one that failed for good FAILURE.
    shown = {"completed": "SUCCESS", "retried": "RETRY", "failed": "FAILURE"}
    step_tasks = {(f"{prefix}{s}", shown[status]): n for (s, status), n in STEP_ATTEMPTS.items()}
    step_tasks.update(
        {
            (f"{prefix}{s}.compensate", shown[status]): n
            for (s, status), n in COMPENSATION_ATTEMPTS.items()
        }
    )
    wait_for("every step task in Flower", lambda: seen() == Tally(step_tasks), 30, observed.logs)
