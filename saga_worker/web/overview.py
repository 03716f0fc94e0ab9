"""What the overview page reads: counts per type and state, the sagas that need someone
(failed, stalled, parked, waiting) and the last hour's outcomes. Each query is bounded and
served by an index: state, the live-deadline and parked/waiting partial indexes, and the
audit table's (event_type, timestamp)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from ..store.tables import audit_logs, checkpoints

#: Rows of each "needs someone" list on the overview.
LIST_LIMIT = 20
OUTCOMES = ("saga_complete", "saga_compensated", "saga_aborted", "saga_failed")


@dataclass
class Overview:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    stalled: list[dict[str, Any]] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[dict[str, Any]] = field(default_factory=list)
    last_hour: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "failed": self.failed,
            "stalled": self.stalled,
            "parked": self.parked,
            "waiting": self.waiting,
            "last_hour": self.last_hour,
        }


_SUMMARY = (
    checkpoints.c.saga_id,
    checkpoints.c.saga_type,
    checkpoints.c.state,
    checkpoints.c.current_step_index,
    checkpoints.c.total_steps,
    checkpoints.c.updated_at,
    checkpoints.c.deadline,
    checkpoints.c.error,
    checkpoints.c.parked_at,
    checkpoints.c.waiting_for,
    checkpoints.c.waiting_since,
)


def read(engine: Engine, now: datetime, redact: Callable[[str | None], str | None]) -> Overview:
    """`redact` masks each listed saga's error, as `SagaClient.status` and `list_sagas` do."""
    c = checkpoints.c
    result = Overview()
    with engine.connect() as conn:
        for saga_type, state, count in conn.execute(
            select(c.saga_type, c.state, func.count()).group_by(c.saga_type, c.state)
        ):
            result.counts.setdefault(saga_type, {})[state] = int(count)
        lists = {
            "failed": select(*_SUMMARY).where(c.state == "FAILED").order_by(c.updated_at.desc()),
            "stalled": select(*_SUMMARY)
            .where(c.deadline.is_not(None), c.deadline < now)
            .order_by(c.deadline),
            "parked": select(*_SUMMARY).where(c.parked_at.is_not(None)).order_by(c.parked_at),
            "waiting": select(*_SUMMARY)
            .where(c.waiting_for.is_not(None))
            .order_by(c.waiting_since),
        }
        for name, query in lists.items():
            rows = conn.execute(query.limit(LIST_LIMIT)).mappings()
            listed = [dict(r) for r in rows]
            for row in listed:
                row["error"] = redact(row["error"])
            setattr(result, name, listed)
        a = audit_logs.c
        since = now - timedelta(hours=1)
        for event_type in OUTCOMES:
            # One index range scan each on (event_type, timestamp).
            count = conn.execute(
                select(func.count()).where(a.event_type == event_type, a.timestamp >= since)
            ).scalar_one()
            result.last_hour[event_type] = int(count)
    return result
