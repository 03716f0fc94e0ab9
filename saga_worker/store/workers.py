"""Worker heartbeats and versions in flight: what `saga-worker versions` and the sweep read.

Each worker keeps one row, refreshed every few seconds by its main process and deleted when
it stops. The recovery sweep reads it to park sagas whose version no live worker has, and
`saga-worker versions` shows it so a deploy can wait until an old version is drained.

A row is keyed by the worker's Celery node name plus an instance id drawn when the worker
starts (`row_key`): two workers may share a node name (`celery@HOST` unless `-n` is given,
say the old and the new generation during a rolling deploy on one host), and must neither
overwrite each other's row nor delete it on a warm shutdown.

Whether a row is live is decided on one clock: on PostgreSQL the database's `now()` writes
`seen_at` and is what it is compared with, so workers and sweeps on hosts whose clocks
disagree still agree; SQLite is one host, so the caller's clock is used there.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, delete, func, insert, select, update

from ..core.model import SagaState
from .port import VersionKey
from .tables import checkpoints, workers

#: Between the node name and the instance id in a row's key.
KEY_SEPARATOR = "#"
#: A row not refreshed for this long is deleted when a worker starts: a killed worker's row
#: stops counting as live after LIVE_WINDOW, but would stay in the table for ever.
PRUNE_AFTER = timedelta(days=1)


def row_key(node: str, instance: str) -> str:
    """The `name` of a worker's row: its Celery node name and its instance id."""
    return f"{node}{KEY_SEPARATOR}{instance}"


def split_key(key: str) -> tuple[str, str]:
    """(node name, instance id) of a row's key ('' for a row written before instance ids)."""
    node, sep, instance = key.rpartition(KEY_SEPARATOR)
    return (node, instance) if sep else (key, "")


@dataclass(frozen=True)
class WorkerRow:
    """One worker's heartbeat row."""

    node: str  # the Celery node name (`celery@HOST` unless -n is given)
    instance: str  # drawn when the worker started: workers may share a node name
    queue: str
    versions: tuple[VersionKey, ...]
    started_at: datetime  # its first heartbeat
    seen_at: datetime  # its last heartbeat

    @property
    def key(self) -> str:
        return row_key(self.node, self.instance)


def database_clock(engine: Engine, now: datetime) -> ColumnElement[datetime] | datetime:
    """What "now" is for heartbeats: PostgreSQL's now() (one clock for every host), else
    `now` (SQLite: a single host)."""
    return func.now() if engine.dialect.name == "postgresql" else now


def beat(
    engine: Engine,
    node: str,
    instance: str,
    queue: str,
    versions: Collection[VersionKey],
    now: datetime,
) -> None:
    """Insert or refresh this worker's row (one short transaction); `now` is used on SQLite
    only (database_clock)."""
    listed = [{"saga_type": t, "version": v} for t, v in sorted(versions)]
    clock = database_clock(engine, now)
    values: dict[str, Any] = {"queue": queue, "versions": listed, "seen_at": clock}
    key = row_key(node, instance)
    with engine.begin() as conn:
        changed = conn.execute(update(workers).where(workers.c.name == key).values(**values))
        if changed.rowcount == 0:
            conn.execute(insert(workers).values(name=key, started_at=clock, **values))


def forget(engine: Engine, node: str, instance: str) -> None:
    """Delete this worker's row (and only this worker's): it stopped, and no longer has any
    version."""
    with engine.begin() as conn:
        conn.execute(delete(workers).where(workers.c.name == row_key(node, instance)))


def prune(engine: Engine, now: datetime, older_than: timedelta = PRUNE_AFTER) -> int:
    """Delete the rows not refreshed for `older_than` (killed workers'); how many."""
    cutoff = database_clock(engine, now) - older_than
    with engine.begin() as conn:
        return conn.execute(delete(workers).where(workers.c.seen_at < cutoff)).rowcount


def live_workers(engine: Engine, window: timedelta, now: datetime) -> list[WorkerRow]:
    """Workers whose last heartbeat is at most `window` old (database_clock: `now` is used on
    SQLite only), by node name."""
    with engine.connect() as conn:
        rows = conn.execute(live_query(engine, window, now)).mappings().all()
    return [
        WorkerRow(
            *split_key(r["name"]),
            r["queue"],
            tuple((str(v["saga_type"]), str(v["version"])) for v in r["versions"] or ()),
            r["started_at"],
            r["seen_at"],
        )
        for r in rows
    ]


def live_query(engine: Engine, window: timedelta, now: datetime) -> Select[Any]:
    """The rows of `live_workers`."""
    cutoff = database_clock(engine, now) - window
    return select(workers).where(workers.c.seen_at >= cutoff).order_by(workers.c.name)


def live_versions(engine: Engine, window: timedelta, now: datetime) -> set[VersionKey]:
    """The versions of the live workers (`live_workers`)."""
    return {key for worker in live_workers(engine, window, now) for key in worker.versions}


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
