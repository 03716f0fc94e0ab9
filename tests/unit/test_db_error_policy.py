"""Issue 14, item 4: only database errors that can pass are retried; others are settled once."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from saga_worker.config import Settings
from saga_worker.metrics.hooks import REJECTION_REASONS, MetricsHook, SagaMetrics
from saga_worker.worker.runtime import RuntimeFactory
from saga_worker.worker.tasks import settle_permanent_db_errors


def _runtimes() -> tuple[RuntimeFactory, CollectorRegistry]:
    registry = CollectorRegistry()
    hook = MetricsHook(SagaMetrics(registry))
    runtimes = RuntimeFactory(app=None, settings=Settings.from_env())
    runtimes.rejection_hooks.append(hook.on_rejected)
    return runtimes, registry


def _count(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("saga_rejected_total", {"reason": reason})
    return value or 0.0


PERMANENT: list[DataError | IntegrityError] = [
    DataError("INSERT ...", {}, psycopg.DataError("PostgreSQL text fields cannot contain NUL")),
    IntegrityError("INSERT ...", {}, psycopg.IntegrityError("duplicate key value\nDETAIL: x")),
]


@pytest.mark.parametrize("error", PERMANENT, ids=["DataError", "IntegrityError"])
def test_a_permanent_database_error_is_settled_once_and_counted(
    error: DataError | IntegrityError,
) -> None:
    runtimes, registry = _runtimes()
    runs: list[int] = []

    @settle_permanent_db_errors(runtimes, "saga.test")
    def task(*args: Any, **kwargs: Any) -> dict[str, Any]:
        runs.append(1)
        raise error

    result = task(1, x=2)
    assert runs == [1]
    assert result["accepted"] is False
    assert type(error.orig).__name__ in result["error"]
    assert "\n" not in result["error"]
    assert _count(registry, "unstorable") == 1


def test_a_transient_database_error_reaches_the_autoretry() -> None:
    runtimes, registry = _runtimes()
    error = OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed"))

    @settle_permanent_db_errors(runtimes, "saga.test")
    def task() -> None:
        raise error

    with pytest.raises(OperationalError):
        task()
    assert _count(registry, "unstorable") == 0


def test_rejection_reasons_are_a_fixed_set() -> None:
    hook = MetricsHook(SagaMetrics(CollectorRegistry()))
    for reason in REJECTION_REASONS:
        hook.on_rejected(reason)
    with pytest.raises(ValueError, match="REJECTION_REASONS"):
        hook.on_rejected("anything a message says")
