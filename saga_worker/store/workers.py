"""Worker heartbeats and versions in flight: what `saga-worker versions` and the sweep read.

Each worker keeps one row, refreshed every few seconds by its main process and deleted when
it stops. The recovery sweep reads it to park sagas whose version no live worker has, and
`saga-worker versions` shows it so a deploy can wait until an old version is drained.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from ..core.model import SagaState
from .port import VersionKey
from .tables import checkpoints, workers


@dataclass(frozen=True)
class WorkerRow:
    """One worker's heartbeat row."""

    name: str
    queue: str
    versions: tuple[VersionKey, ...]
    started_at: datetime
    seen_at: datetime


def beat(
    engine: Engine,
    name: str,
    queue: str,
    versions: Collection[VersionKey],
    now: datetime,
    started_at: datetime,
) -> None:
    """Insert or refresh this worker's row (one short transaction)."""
    listed = [{"saga_type": t, "version": v} for t, v in sorted(versions)]
    values: dict[str, Any] = {"queue": queue, "versions": listed, "seen_at": now}
    with engine.begin() as conn:
        changed = conn.execute(update(workers).where(workers.c.name == name).values(**values))
        if changed.rowcount == 0:
            conn.execute(insert(workers).values(name=name, started_at=started_at, **values))


def forget(engine: Engine, name: str) -> None:
    """Delete this worker's row: it stopped, and no longer has any version."""
    with engine.begin() as conn:
        conn.execute(delete(workers).where(workers.c.name == name))


def live_workers(engine: Engine, since: datetime) -> list[WorkerRow]:
    """Workers whose heartbeat is not older than `since`, by name."""
    query = select(workers).where(workers.c.seen_at >= since).order_by(workers.c.name)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        WorkerRow(
            r["name"],
            r["queue"],
            tuple((str(v["saga_type"]), str(v["version"])) for v in r["versions"] or ()),
            r["started_at"],
            r["seen_at"],
        )
        for r in rows
    ]


def live_versions(engine: Engine, since: datetime) -> set[VersionKey]:
    return {key for worker in live_workers(engine, since) for key in worker.versions}


def parked(engine: Engine, versions: Sequence[VersionKey], limit: int) -> list[str]:
    """Ids of parked sagas of these versions (the partial index ix_saga_checkpoints_parked)."""
    if not versions:
        return []
    c = checkpoints.c
    found: list[str] = []
    with engine.connect() as conn:
        for saga_type, version in versions:
            query = (
                select(c.saga_id)
                .where(c.parked_at.is_not(None))
                .where(c.saga_type == saga_type, c.definition_version == version)
                .order_by(c.parked_at)
                .limit(limit - len(found))
            )
            found.extend(conn.execute(query).scalars())
            if len(found) >= limit:
                break
    return found


@dataclass(frozen=True)
class VersionLoad:
    """Sagas not yet ended of one (saga_type, definition version)."""

    saga_type: str
    version: str | None
    running: int  # RUNNING or COMPENSATING, not parked
    parked: int
    failed: int  # FAILED: an operator must act (`saga-worker retry`)
    oldest: datetime | None  # the earliest started_at among them


def versions_in_flight(engine: Engine) -> list[VersionLoad]:
    """Per (saga_type, version): live sagas, by (type, version); terminal ones are not read
    beyond the state index."""
    c = checkpoints.c
    live = (SagaState.RUNNING.value, SagaState.COMPENSATING.value, SagaState.FAILED.value)
    parked = c.parked_at.is_not(None)
    query = (
        select(
            c.saga_type,
            c.definition_version,
            c.state,
            parked,
            func.count(),
            func.min(c.started_at),
        )
        .where(c.state.in_(live))
        .group_by(c.saga_type, c.definition_version, c.state, parked)
    )
    loads: dict[tuple[str, str | None], dict[str, Any]] = {}
    with engine.connect() as conn:
        for saga_type, version, state, is_parked, count, oldest in conn.execute(query):
            entry = loads.setdefault(
                (saga_type, version), {"running": 0, "parked": 0, "failed": 0, "oldest": None}
            )
            key = (
                "failed"
                if state == SagaState.FAILED.value
                else "parked"
                if is_parked
                else "running"
            )
            entry[key] += int(count)
            if oldest is not None and (entry["oldest"] is None or oldest < entry["oldest"]):
                entry["oldest"] = oldest
    return [
        VersionLoad(saga_type, version, **entry)
        for (saga_type, version), entry in sorted(
            loads.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))
        )
    ]
