"""Prometheus metrics (docs/contract.md, Metrics), fed by engine hooks and served per process group.

Counters and histograms: every prefork child writes its own memory-mapped file in a private
directory that the worker's main process creates before the pool forks (prometheus_client's
multiprocess mode); the main process serves the sum of all files on SAGA_METRICS_PORT. Files
of children that exited (recycled by max_tasks_per_child, or killed) are folded into one
archive file per type at scrape time, so totals stay exact and the directory stays small.

Gauges of saga states (`saga_running_current` and two additions, `saga_failed_current` and
`saga_stalled_current`) are read from the checkpoint table at scrape time: the database is the
only place that knows how many sagas are in flight across every worker, including sagas whose
process died, so no per-process arithmetic can drift.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    mmap_dict,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from . import registry as saga_registry
from .config import Settings
from .core.definition import SagaDefinition
from .core.model import SagaState
from .engine import TransitionRecord

log = logging.getLogger(__name__)

# The multiprocess internals are untyped; these are the documented extension points
# (MultiProcessValue's process_identifier, MultiProcessCollector.merge, the mmap file format).
MmapedDict: Any = mmap_dict.MmapedDict
MultiProcessCollector: Any = multiprocess.MultiProcessCollector
MultiProcessValue: Any = values.MultiProcessValue

#: Names of docs/contract.md (Metrics) as exposed (counters with their `_total` suffix).
DESIGN_METRICS = frozenset(
    {
        "saga_started_total",
        "saga_completed_total",
        "saga_failed_total",
        "saga_aborted_total",
        "saga_running_current",
        "saga_duration_seconds",
        "saga_step_executed_total",
        "saga_step_failed_total",
        "saga_step_retry_total",
        "saga_step_duration_seconds",
        "saga_compensation_executed_total",
        "saga_compensation_failed_total",
        "saga_compensation_duration_seconds",
        "saga_checkpoint_saved_total",
        "saga_checkpoint_loaded_total",
        "saga_checkpoint_save_duration_seconds",
        "saga_audit_log_written_total",
        "saga_audit_log_write_duration_seconds",
        "saga_recovered_total",
    }
)
#: Gauges added to those for the alerts on sagas waiting for an operator or stalled.
EXTRA_METRICS = frozenset({"saga_failed_current", "saga_stalled_current"})
METRIC_NAMES = DESIGN_METRICS | EXTRA_METRICS

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SAGA_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

#: failure_reason of saga_failed_total, by the terminal event that ended the saga.
FAILURE_REASONS = {
    "saga_compensated": "step_failed",  # a step failed for good; fully rolled back
    "saga_failed": "compensation_failed",  # rollback incomplete: state FAILED
}
#: status label of saga_duration_seconds, by terminal event.
SAGA_STATUS = {
    "saga_complete": "completed",
    "saga_compensated": "compensated",
    "saga_failed": "failed",
    "saga_aborted": "aborted",
}
#: status label of step/compensation durations: how the attempt ended.
ATTEMPT_STATUS = {
    "step_complete": "completed",
    "step_retry": "retried",
    "step_failed": "failed",
    "compensation_complete": "completed",
    "compensation_retry": "retried",
    "compensation_failed": "failed",
}


class SagaMetrics:
    """The contract's counters and histograms, and how one transition updates them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # registry=None: in multiprocess mode the values live in files, not in a registry.
        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        t, ts = ("saga_type",), ("saga_type", "step_name")
        self.started = counter("saga_started_total", "Sagas started (duplicates excluded).", t)
        self.completed = counter("saga_completed_total", "Sagas that ended COMPLETED.", t)
        self.failed = counter(
            "saga_failed_total",
            "Sagas that ended COMPENSATED (failure_reason=step_failed) or FAILED "
            "(failure_reason=compensation_failed).",
            ("saga_type", "failure_reason"),
        )
        self.aborted = counter("saga_aborted_total", "Sagas that ended ABORTED.", t)
        self.duration = histogram(
            "saga_duration_seconds",
            "Start to terminal state, by terminal status.",
            ("saga_type", "status"),
            SAGA_BUCKETS,
        )
        self.step_executed = counter(
            "saga_step_executed_total", "Step attempts that reported an outcome.", ts
        )
        self.step_failed = counter(
            "saga_step_failed_total",
            "Steps that failed their last attempt.",
            (*ts, "error_type"),
        )
        self.step_retry = counter("saga_step_retry_total", "Step attempts that were retried.", ts)
        self.step_duration = histogram(
            "saga_step_duration_seconds",
            "Run time of step attempts; status completed, retried or failed.",
            (*ts, "status"),
            STEP_BUCKETS,
        )
        self.compensation_executed = counter(
            "saga_compensation_executed_total",
            "Compensation attempts that reported an outcome.",
            ts,
        )
        self.compensation_failed = counter(
            "saga_compensation_failed_total",
            "Compensations that failed their last attempt.",
            (*ts, "error_type"),
        )
        self.compensation_duration = histogram(
            "saga_compensation_duration_seconds",
            "Run time of compensation attempts; status completed, retried or failed.",
            (*ts, "status"),
            STEP_BUCKETS,
        )
        self.checkpoint_saved = counter(
            "saga_checkpoint_saved_total", "Checkpoint writes committed.", t
        )
        self.checkpoint_loaded = counter(
            "saga_checkpoint_loaded_total", "Checkpoints read to decide a transition.", t
        )
        self.checkpoint_save_duration = histogram(
            "saga_checkpoint_save_duration_seconds",
            "Duration of the transaction that writes a checkpoint and its audit rows.",
            t,
            WRITE_BUCKETS,
        )
        self.audit_written = counter(
            "saga_audit_log_written_total",
            "Audit rows committed.",
            ("saga_type", "event_type"),
        )
        self.audit_write_duration = histogram(
            "saga_audit_log_write_duration_seconds",
            "Duration of the transaction that committed the audit row (one per row).",
            ("event_type",),
            WRITE_BUCKETS,
        )
        self.recovered = counter(
            "saga_recovered_total", "Stalled attempts re-sent by the recovery sweep.", t
        )

    def preinitialize(self, definitions: Iterable[SagaDefinition]) -> None:
        """Expose zeros for every known saga type and step, so a first event shows in rate()."""
        for definition in definitions:
            saga_type = definition.saga_type
            for metric in (
                self.started,
                self.completed,
                self.aborted,
                self.recovered,
                self.checkpoint_saved,
                self.checkpoint_loaded,
            ):
                metric.labels(saga_type)
            for reason in FAILURE_REASONS.values():
                self.failed.labels(saga_type, reason)
            for step in definition.steps:
                self.step_executed.labels(saga_type, step.name)
                self.step_retry.labels(saga_type, step.name)
                if step.compensate is not None:
                    self.compensation_executed.labels(saga_type, step.name)

    def observe(self, record: TransitionRecord) -> None:
        """Count one transition; an ignored one only counts its checkpoint read."""
        saga_type = record.definition.saga_type
        decision = record.decision
        if record.loaded:
            self.checkpoint_loaded.labels(saga_type).inc()
        if decision.ignored is not None:
            return
        self.checkpoint_saved.labels(saga_type).inc()
        self.checkpoint_save_duration.labels(saga_type).observe(record.commit_seconds)
        for event in decision.audit:
            kind = event.event_type
            self.audit_written.labels(saga_type, kind).inc()
            # Audit rows commit in the checkpoint's transaction: that is their write latency.
            self.audit_write_duration.labels(kind).observe(record.commit_seconds)
            step = event.step_name or ""
            seconds = None if event.duration_ms is None else event.duration_ms / 1000
            error_type = str(event.event_data.get("error_type") or "unknown")
            if kind == "saga_start":
                self.started.labels(saga_type).inc()
            elif kind == "saga_recovered":
                self.recovered.labels(saga_type).inc()
            elif kind in SAGA_STATUS:
                if kind == "saga_complete":
                    self.completed.labels(saga_type).inc()
                elif kind == "saga_aborted":
                    self.aborted.labels(saga_type).inc()
                else:
                    self.failed.labels(saga_type, FAILURE_REASONS[kind]).inc()
                if seconds is not None:
                    self.duration.labels(saga_type, SAGA_STATUS[kind]).observe(seconds)
            elif kind.startswith("step_") and kind in ATTEMPT_STATUS:
                self.step_executed.labels(saga_type, step).inc()
                if kind == "step_retry":
                    self.step_retry.labels(saga_type, step).inc()
                elif kind == "step_failed":
                    self.step_failed.labels(saga_type, step, error_type).inc()
                if seconds is not None:
                    status = ATTEMPT_STATUS[kind]
                    self.step_duration.labels(saga_type, step, status).observe(seconds)
            elif kind in ATTEMPT_STATUS:
                self.compensation_executed.labels(saga_type, step).inc()
                if kind == "compensation_failed":
                    self.compensation_failed.labels(saga_type, step, error_type).inc()
                if seconds is not None:
                    status = ATTEMPT_STATUS[kind]
                    self.compensation_duration.labels(saga_type, step, status).observe(seconds)


class MetricsHook:
    """The engine hook; records nothing until metrics are enabled in this process group."""

    def __init__(self, metrics: SagaMetrics | None = None) -> None:
        self.metrics = metrics

    def on_transition(self, record: TransitionRecord) -> None:
        if self.metrics is not None:
            self.metrics.observe(record)


# -- saga state gauges, from the database --------------------------------------------------


class SagaStateCollector:
    """`saga_running_current`, `saga_failed_current`, `saga_stalled_current` per saga type.

    One grouped count over the (saga_type, state) index per scrape, cached for `ttl` seconds
    so that several scrapers cost one query. When the database cannot be read the gauges
    are left out of the scrape (a stale number would be worse than none).
    """

    def __init__(self, database_url: str, ttl: float = 2.0) -> None:
        self.database_url = database_url
        self.ttl = ttl
        self._engine: Any = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, dict[str, int]]] | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """{saga_type: {"running": n, "failed": n, "stalled": n}}, every registered type."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.ttl:
                self._cached = (now, self._query())
            return self._cached[1]

    def _query(self) -> dict[str, dict[str, int]]:
        from sqlalchemy import case, create_engine, func, select, text
        from sqlalchemy.pool import NullPool

        from .store.connect import create_db_engine
        from .store.tables import checkpoints

        if self._engine is None:
            # NullPool: no connection stays open in the worker's main process, which forks.
            if self.database_url.startswith("sqlite"):
                # A plain deferred read: the store's engine begins IMMEDIATE, a write lock.
                self._engine = create_engine(
                    self.database_url, poolclass=NullPool, connect_args={"timeout": 5}
                )
            else:
                self._engine = create_db_engine(self.database_url, pool=False)
        c = checkpoints.c
        live = (SagaState.RUNNING.value, SagaState.COMPENSATING.value, SagaState.FAILED.value)
        overdue = func.sum(case((c.deadline < datetime.now(UTC), 1), else_=0))
        query = (
            select(c.saga_type, c.state, func.count(), overdue)
            .where(c.state.in_(live))
            .group_by(c.saga_type, c.state)
        )
        result = {d.saga_type: _zero() for d in saga_registry.all_definitions()}
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 5000"))
            for saga_type, state, count, stalled in conn.execute(query):
                entry = result.setdefault(saga_type, _zero())
                key = "failed" if state == SagaState.FAILED.value else "running"
                entry[key] += int(count)
                if key == "running":
                    entry["stalled"] += int(stalled or 0)
        return result

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.counts()
        except Exception as exc:
            log.warning("saga state gauges unavailable: %s", exc)
            return
        families = {
            "running": GaugeMetricFamily(
                "saga_running_current",
                "Sagas RUNNING or COMPENSATING now (from the checkpoint table).",
                labels=["saga_type"],
            ),
            "failed": GaugeMetricFamily(
                "saga_failed_current",
                "Sagas in FAILED now, waiting for an operator (from the checkpoint table).",
                labels=["saga_type"],
            ),
            "stalled": GaugeMetricFamily(
                "saga_stalled_current",
                "Live sagas whose pending attempt is past its deadline, not yet re-sent.",
                labels=["saga_type"],
            ),
        }
        for saga_type, entry in sorted(counts.items()):
            for key, family in families.items():
                family.add_metric([saga_type], entry[key])
        yield from families.values()


def _zero() -> dict[str, int]:
    return {"running": 0, "failed": 0, "stalled": 0}


# -- multiprocess files ------------------------------------------------------------------

_identity: tuple[int, str] | None = None


def process_identifier() -> str:
    """`<pid>-<start time>`: unique per process, so a reused pid never reopens a dead file."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        stat = _proc_stat(pid)
        token = stat[1] if stat is not None else f"t{time.time_ns()}"
        _identity = (pid, f"{pid}-{token}")
    return _identity[1]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from /proc, or None when unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _alive(identifier: str) -> bool:
    pid_text, _, token = identifier.partition("-")
    try:
        pid = int(pid_text)
    except ValueError:
        return True  # not one of ours: leave it alone
    stat = _proc_stat(pid)
    if stat is None:
        if os.path.isdir("/proc"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, start = stat
    # A zombie has written its last value; a different start time is another process.
    return start == token and state not in ("Z", "X")


ARCHIVED_TYPES = ("counter", "histogram")


def compact(path: str) -> int:
    """Fold the files of exited processes into `<type>_archive.db`; returns files removed.

    Counters and histogram buckets are sums, so adding a dead process's values to the
    archive and deleting its file leaves every scraped total unchanged. The caller must
    hold the lock that scrapes of `path` take.
    """
    removed = 0
    for typ in ARCHIVED_TYPES:
        dead = [
            f
            for f in glob.glob(os.path.join(path, f"{typ}_*.db"))
            if not f.endswith("_archive.db") and not _alive(os.path.basename(f)[len(typ) + 1 : -3])
        ]
        if not dead:
            continue
        archive = MmapedDict(os.path.join(path, f"{typ}_archive.db"))
        try:
            for filename in dead:
                for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(filename):
                    current, _ = archive.read_value(key)
                    archive.write_value(key, current + value, 0.0)
                # A crash between the write above and this unlink would count the file
                # twice, but only the main process compacts, and its death ends the group
                # (the next start gets a fresh directory).
                os.remove(filename)
                removed += 1
        finally:
            archive.close()
    return removed


class CompactingMultiProcessCollector:
    """MultiProcessCollector that first compacts the files of processes that exited."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                compact(self.path)
            except Exception:
                log.exception("compacting metric files in %s failed", self.path)
            files = glob.glob(os.path.join(self.path, "*.db"))
            return list(MultiProcessCollector.merge(files, accumulate=True))


# -- process wiring ----------------------------------------------------------------------


@dataclass
class _Served:
    server: WSGIServer | None
    directory: str | None


_served: _Served | None = None


def enable_multiprocess(directory: str) -> None:
    """Make every metric value created from now on (in this process and its forks) a file.

    Must run before any labelled value exists and before the pool forks. prometheus_client
    reads PROMETHEUS_MULTIPROC_DIR when a value is created, and `values.ValueClass` is where
    it looks for the value type; setting both here (instead of before importing it) lets
    the Celery app module import this one.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = MultiProcessValue(process_identifier)


def _serve(port: int, registry: CollectorRegistry) -> WSGIServer:
    server, _thread = start_http_server(port, registry=registry)
    return server


def start_worker_metrics(hook: MetricsHook, settings: Settings, port: int) -> _Served | None:
    """In the worker's main process, before forking: private dir, file values, HTTP server."""
    global _served
    if _served is not None:
        return _served
    _remove_orphaned_directories()
    directory = tempfile.mkdtemp(prefix=f"saga-metrics-{os.getpid()}-")
    enable_multiprocess(directory)
    hook.metrics = SagaMetrics()
    hook.metrics.preinitialize(saga_registry.all_definitions())
    registry = CollectorRegistry()
    registry.register(CompactingMultiProcessCollector(directory))
    registry.register(SagaStateCollector(settings.database_url))
    try:
        server = _serve(port, registry)
    except OSError as exc:
        log.error("metrics: cannot serve on port %s (%s); counting without an endpoint", port, exc)
        _served = _Served(None, directory)
        return _served
    _served = _Served(server, directory)
    return _served


def _remove_orphaned_directories() -> None:
    """Remove directories left by workers that were killed (SIGKILL skips worker_shutdown)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "saga-metrics-*-*")):
        pid_text = os.path.basename(path).split("-")[2]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive under another user: not ours to judge


def start_beat_metrics(settings: Settings, port: int) -> _Served | None:
    """In the beat: the saga state gauges (the beat runs no transitions itself)."""
    global _served
    if _served is not None:  # an embedded beat (worker -B) shares the worker's endpoint
        return _served
    registry = CollectorRegistry()
    registry.register(SagaStateCollector(settings.database_url))
    try:
        server = _serve(port, registry)
    except OSError as exc:
        log.error("metrics: cannot serve on port %s (%s)", port, exc)
        return None
    _served = _Served(server, None)
    log.info("metrics: beat serving on port %s", server.server_port)
    return _served


def forget_in_child() -> None:
    """In a forked pool child: close the inherited listening socket (the parent serves)."""
    global _served
    if _served is not None and _served.server is not None:
        _served.server.socket.close()
    _served = None


def stop() -> None:
    """In the process that started the endpoint: stop it and remove the private directory."""
    global _served
    served, _served = _served, None
    if served is None:
        return
    if served.server is not None:
        served.server.shutdown()
        served.server.server_close()
    if served.directory is not None:
        values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
        shutil.rmtree(served.directory, ignore_errors=True)


def install(app: Any, settings: Settings) -> MetricsHook:
    """Connect the Celery signals that set metrics up; returns the hook for the engine."""
    from celery import signals

    hook = MetricsHook()
    port = settings.metrics_port

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if port is not None and getattr(sender, "app", None) is app:
            start_worker_metrics(hook, settings, port)

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        if port is not None and getattr(sender, "app", None) is app:
            start_beat_metrics(settings, port)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        # Logged here, not at worker_init: Celery sets logging up after that signal.
        if _served is not None and _served.server is not None:
            log.info(
                "metrics: serving on port %s (files in %s)",
                _served.server.server_port,
                _served.directory,
            )

    def on_process_init(**_: Any) -> None:
        forget_in_child()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            stop()

    signals.worker_init.connect(on_worker_init, weak=False)
    signals.beat_init.connect(on_beat_init, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    return hook
