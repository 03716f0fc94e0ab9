"""What the engine's transitions count: the contract's counters and histograms.

`SagaMetrics` holds every counter and histogram of docs/contract.md (Metrics) and maps one
`TransitionRecord` to them; `MetricsHook` is the engine hook that feeds it. Where the values
live (a registry, or memory-mapped files shared by a process group) is decided by whoever
builds `SagaMetrics` (metrics/serve.py); this module only counts.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from ..core.definition import SagaDefinition
from ..engine import TransitionRecord

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
        "saga_rejected_total",
        "saga_waiting_current",
    }
)
#: Gauges added to those for the alerts on sagas waiting for an operator, stalled, parked or
#: waiting past their wait's timeout.
EXTRA_METRICS = frozenset(
    {
        "saga_failed_current",
        "saga_stalled_current",
        "saga_parked_current",
        "saga_waiting_overdue_current",
    }
)
METRIC_NAMES = DESIGN_METRICS | EXTRA_METRICS

#: reason label of saga_rejected_total: why a message was refused. A fixed set, so that
#: whatever a broker writer sends cannot create label values.
REJECTION_REASONS = (
    "invalid_start",  # a saga.start broke a rule of the contract (recorded as saga_rejected)
    "invalid_message",  # a step, advance or abort message of the wrong shape
    "invalid_token",  # a step or result message whose token is not its attempt's
    "not_pending",  # a valid token for an attempt the saga no longer waits for (a replay)
    "unstorable",  # the database refused a value for good (DataError, IntegrityError)
    # A step message of a definition version this worker does not have, or whose step index
    # does not name that task in it (sent by hand, or by a build before versions): not run,
    # the attempt stalls and the recovery sweep sends it to its version's queue or parks it.
    "wrong_version",
)

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
        self.rejected = counter(
            "saga_rejected_total",
            "Messages refused without changing a saga, by reason (REJECTION_REASONS).",
            ("reason",),
        )

    def preinitialize(self, definitions: Iterable[SagaDefinition]) -> None:
        """Expose zeros for every known saga type and step, so a first event shows in rate()."""
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
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
        decision = record.decision
        saga_type = decision.saga.saga_type
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

    def on_rejected(self, reason: str) -> None:
        """Count a refused message; `reason` is one of REJECTION_REASONS."""
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}: use one of REJECTION_REASONS")
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
