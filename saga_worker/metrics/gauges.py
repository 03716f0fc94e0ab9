"""Gauges of saga states, read from the checkpoint table at scrape time.

`saga_running_current`, `saga_failed_current`, `saga_stalled_current`, `saga_parked_current`,
`saga_waiting_current` and `saga_waiting_overdue_current`:
the database is the only place that knows how many sagas are in flight across every worker,
including sagas whose process died, so no per-process arithmetic can drift.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .. import registry as saga_registry
from ..core.model import SagaState

log = logging.getLogger(__name__)


class SagaStateCollector:
    """`saga_running_current`, `_failed_`, `_stalled_` and `_parked_current` per saga type.

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
        """{saga_type: {"running": n, "failed": n, "stalled": n, "parked": n}}, every
        registered type."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.ttl:
                self._cached = (now, self._query())
            return self._cached[1]

    def _query(self) -> dict[str, dict[str, int]]:
        from sqlalchemy import case, create_engine, func, select, text
        from sqlalchemy.pool import NullPool

        from ..store.connect import create_db_engine
        from ..store.tables import checkpoints

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
        parked = func.sum(case((c.parked_at.is_not(None), 1), else_=0))
        waiting = func.sum(case((c.waiting_for.is_not(None), 1), else_=0))
        late = c.waiting_for.is_not(None) & (c.deadline < datetime.now(UTC))
        waiting_late = func.sum(case((late, 1), else_=0))
        query = (
            select(c.saga_type, c.state, func.count(), overdue, parked, waiting, waiting_late)
            .where(c.state.in_(live))
            .group_by(c.saga_type, c.state)
        )
        result = {d.saga_type: _zero() for d in saga_registry.all_definitions()}
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 5000"))
            for saga_type, state, count, stalled, parked_count, waits, late_waits in conn.execute(
                query
            ):
                entry = result.setdefault(saga_type, _zero())
                key = "failed" if state == SagaState.FAILED.value else "running"
                entry[key] += int(count)
                if key == "running":
                    entry["stalled"] += int(stalled or 0)
                    entry["parked"] += int(parked_count or 0)
                    entry["waiting"] += int(waits or 0)
                    entry["waiting_overdue"] += int(late_waits or 0)
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
            "parked": GaugeMetricFamily(
                "saga_parked_current",
                "Live sagas parked because no live worker has their definition version.",
                labels=["saga_type"],
            ),
            "waiting": GaugeMetricFamily(
                "saga_waiting_current",
                "Sagas waiting for a signal, an approval or a durable timer.",
                labels=["saga_type"],
            ),
            "waiting_overdue": GaugeMetricFamily(
                "saga_waiting_overdue_current",
                "Waiting sagas past their wait's timeout that the recovery sweep has not fired.",
                labels=["saga_type"],
            ),
        }
        for saga_type, entry in sorted(counts.items()):
            for key, family in families.items():
                family.add_metric([saga_type], entry[key])
        yield from families.values()


def _zero() -> dict[str, int]:
    return {
        "running": 0,
        "failed": 0,
        "stalled": 0,
        "parked": 0,
        "waiting": 0,
        "waiting_overdue": 0,
    }
