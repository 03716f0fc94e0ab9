"""Read-only queries: the recovery scan, the operator's filters and the streaming audit reader."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, func, select, tuple_

from ..core.model import TERMINAL_STATES, Saga, SagaState
from .codec import saga_from_row
from .tables import audit_logs, checkpoints


def stalled_query(
    now: datetime, limit: int, after: tuple[datetime, str] | None = None
) -> Select[Any]:
    """The recovery scan: live checkpoints whose deadline passed, by (deadline, saga_id).

    Terminal sagas have no deadline, so the partial index ix_saga_checkpoints_deadline_live
    holds only live ones; the row comparison of a later page is an index condition too.
    """
    c = checkpoints.c
    query = select(c.saga_id, c.pending, c.deadline, c.saga_type, c.definition_version).where(
        c.deadline.is_not(None), c.deadline < now
    )
    if after is not None:
        key = (checkpoints.c.deadline, checkpoints.c.saga_id)
        # Typed binds: the deadline must go through UTCDateTime like the column's values.
        query = query.where(tuple_(*key) > tuple_(*after, types=[c.type for c in key]))
    return query.order_by(checkpoints.c.deadline, checkpoints.c.saga_id).limit(limit)


# -- filters and the streaming audit reader (read-only, used by the CLI and exports) ----


@dataclass(frozen=True)
class SagaQuery:
    """Which checkpoints `list_sagas` returns; every field is optional."""

    states: Sequence[str] = ()
    saga_type: str | None = None
    user_id: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    #: Only sagas waiting for a signal, an approval or a timer.
    waiting: bool = False
    #: Only the sagas with this business key (exact match; ix_saga_checkpoints_business_key).
    business_key: str | None = None


@dataclass(frozen=True)
class AuditQuery:
    """Which audit rows an export or a verification reads; every field is optional."""

    since: datetime | None = None
    until: datetime | None = None
    saga_type: str | None = None
    saga_id: str | None = None


def _saga_filter(query: Select[Any], q: SagaQuery) -> Select[Any]:
    if q.states:
        query = query.where(checkpoints.c.state.in_(list(q.states)))
    if q.saga_type is not None:
        query = query.where(checkpoints.c.saga_type == q.saga_type)
    if q.user_id is not None:
        query = query.where(checkpoints.c.user_id == q.user_id)
    if q.started_after is not None:
        query = query.where(checkpoints.c.started_at >= q.started_after)
    if q.started_before is not None:
        query = query.where(checkpoints.c.started_at < q.started_before)
    if q.waiting:
        query = query.where(checkpoints.c.waiting_for.is_not(None))
    if q.business_key is not None:
        query = query.where(checkpoints.c.business_key == q.business_key)
    return query


def _audit_filter(query: Select[Any], q: AuditQuery) -> Select[Any]:
    if q.since is not None:
        query = query.where(audit_logs.c.timestamp >= q.since)
    if q.until is not None:
        query = query.where(audit_logs.c.timestamp < q.until)
    if q.saga_id is not None:
        query = query.where(audit_logs.c.saga_id == q.saga_id)
    if q.saga_type is not None:
        query = query.where(
            audit_logs.c.saga_id.in_(
                select(checkpoints.c.saga_id).where(checkpoints.c.saga_type == q.saga_type)
            )
        )
    return query


class AuditReader:
    """Streams audit rows (by id) and checkpoint heads; see `SagaStore.audit_snapshot`."""

    def __init__(self, engine: Engine, conn: Connection | None, batch: int) -> None:
        self.engine = engine
        self.conn = conn
        self.batch = batch

    def count(self, query: AuditQuery) -> int:
        """How many rows `rows(query)` will yield (for a progress bar)."""
        stmt = _audit_filter(select(func.count()).select_from(audit_logs), query)
        if self.conn is not None:
            return int(self.conn.execute(stmt).scalar_one())
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def rows(self, query: AuditQuery) -> Iterator[dict[str, Any]]:
        """Matching audit rows in id order, one at a time, never all in memory."""
        if self.conn is not None:
            stmt = self._by_id(self.conn, query)
            if stmt is None:
                return
            result = self.conn.execute(stmt.execution_options(yield_per=self.batch))
            try:
                for row in result.mappings():
                    yield dict(row)
            finally:
                result.close()
            return
        with self.engine.connect() as conn:
            found = self._by_id(conn, query)
        if found is None:
            return
        stmt = found
        last = 0
        while True:
            with self.engine.connect() as conn:
                batch = [
                    dict(r)
                    for r in conn.execute(
                        stmt.where(audit_logs.c.id > last).limit(self.batch)
                    ).mappings()
                ]
            if not batch:
                return
            yield from batch
            last = batch[-1]["id"]

    @staticmethod
    def _by_id(conn: Connection, query: AuditQuery) -> Select[Any] | None:
        """The rows' statement in id order; None when a time range holds no row.

        A time range is first turned into the ids it spans (min and max id of its rows,
        read through the timestamp index). Without that bound the planner walks the primary
        key from the table's first row for `ORDER BY id` (it assumes matching rows are
        spread evenly over the ids, where in an append-only table they are one stretch) and
        filters every row before the range.
        """
        stmt = _audit_filter(select(audit_logs), query).order_by(audit_logs.c.id)
        if query.since is None and query.until is None:
            return stmt
        a = audit_logs.c
        # `id + 0`: min(id) alone would be planned as that same walk of the primary key.
        low, high = conn.execute(
            _audit_filter(select(func.min(a.id + 0), func.max(a.id + 0)), query)
        ).one()
        if low is None:
            return None
        # Only the bounds the range has: rows appended later (an open-ended range read in
        # batches, not in one snapshot) still come after `high`.
        if query.since is not None:
            stmt = stmt.where(a.id >= low)
        if query.until is not None:
            stmt = stmt.where(a.id <= high)
        return stmt

    def heads(self, saga_type: str | None = None) -> Iterator[tuple[str, str]]:
        """(saga_id, audit_head) of every checkpoint (of one saga type), streamed."""
        stmt = select(checkpoints.c.saga_id, checkpoints.c.audit_head).order_by(
            checkpoints.c.saga_id
        )
        if saga_type is not None:
            stmt = stmt.where(checkpoints.c.saga_type == saga_type)
        if self.conn is not None:
            result = self.conn.execute(stmt.execution_options(yield_per=self.batch * 5))
            try:
                for saga_id, head in result:
                    yield str(saga_id), str(head)
            finally:
                result.close()
            return
        last = ""
        while True:
            with self.engine.connect() as conn:
                batch = conn.execute(
                    stmt.where(checkpoints.c.saga_id > last).limit(self.batch * 5)
                ).all()
            if not batch:
                return
            for saga_id, head in batch:
                yield str(saga_id), str(head)
            last = str(batch[-1][0])


class OperatorQueries:
    """Read-only queries of the operator CLI, the console and the audit export."""

    engine: Engine

    def list_sagas(self, query: SagaQuery, *, limit: int, offset: int = 0) -> list[Saga]:
        """Sagas matching `query`, newest first (started_at, then saga_id, descending)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                _saga_filter(select(checkpoints), query)
                .order_by(checkpoints.c.started_at.desc(), checkpoints.c.saga_id.desc())
                .limit(limit)
                .offset(offset)
            ).mappings()
            return [saga_from_row(r) for r in rows]

    def count_sagas_by_state(self, query: SagaQuery, *, limit: int | None = None) -> dict[str, int]:
        """How many sagas match `query` in each state (the state filter itself ignored).

        With `limit`, each state's count stops at limit + 1 (one bounded index scan per
        state instead of counting every match): a count above `limit` means "more".
        """
        # Every other filter applies (a field added to SagaQuery is not forgotten here).
        unfiltered = replace(query, states=())
        if limit is not None:
            return self._bounded_counts(unfiltered, limit)
        with self.engine.connect() as conn:
            rows = conn.execute(
                _saga_filter(
                    select(checkpoints.c.state, func.count()).group_by(checkpoints.c.state),
                    unfiltered,
                )
            ).all()
        return {str(state): int(count) for state, count in rows}

    def _bounded_counts(self, query: SagaQuery, limit: int) -> dict[str, int]:
        c = checkpoints.c
        per_state = [
            select(func.count())
            .select_from(
                _saga_filter(select(c.saga_id).where(c.state == state.value), query)
                .limit(limit + 1)
                .subquery()
            )
            .scalar_subquery()
            .label(state.value)
            for state in SagaState
        ]
        with self.engine.connect() as conn:
            row = conn.execute(select(*per_state)).one()
        return {state.value: int(n) for state, n in zip(SagaState, row, strict=True) if n}

    def saga_chain(self, saga_id: str) -> tuple[list[dict[str, Any]], str | None]:
        """One saga's audit rows and its checkpoint's audit_head, read in one transaction."""
        with self.engine.connect() as conn:
            head = conn.execute(
                select(checkpoints.c.audit_head).where(checkpoints.c.saga_id == saga_id)
            ).scalar()
            rows = [
                dict(r)
                for r in conn.execute(
                    select(audit_logs)
                    .where(audit_logs.c.saga_id == saga_id)
                    .order_by(audit_logs.c.id)
                ).mappings()
            ]
        return rows, None if head is None else str(head)

    def shape_rows(self, saga_id: str) -> list[dict[str, Any]]:
        """A saga's saga_start and saga_migrated rows (event_type, event_data), oldest first:
        the outlines of the versions it ran under (core/migration.py)."""
        a = audit_logs.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(a.event_type, a.event_data)
                .where(a.saga_id == saga_id, a.event_type.in_(["saga_start", "saga_migrated"]))
                .order_by(a.id)
            ).mappings()
            return [dict(r) for r in rows]

    def in_flight_ids(
        self, saga_type: str, version: str, *, after: str = "", limit: int = 200
    ) -> list[str]:
        """Up to `limit` ids above `after` of the sagas in flight of one definition version,
        by id: pages of a batch migration, read one at a time."""
        c = checkpoints.c
        with self.engine.connect() as conn:
            return [
                str(saga_id)
                for saga_id in conn.execute(
                    select(c.saga_id)
                    .where(
                        c.saga_type == saga_type,
                        c.definition_version == version,
                        c.state.not_in([s.value for s in TERMINAL_STATES]),
                        c.saga_id > after,
                    )
                    .order_by(c.saga_id)
                    .limit(limit)
                ).scalars()
            ]

    @contextmanager
    def audit_snapshot(self, batch: int = 2000) -> Iterator[AuditReader]:
        """A reader of audit rows and checkpoint heads that streams in constant memory.

        PostgreSQL: one REPEATABLE READ, READ ONLY transaction with server-side cursors, so
        rows and heads come from one snapshot. SQLite: keyset batches in short transactions
        (writers there are serialised, so ids grow in commit order and no row is skipped).
        """
        if self.engine.dialect.name != "postgresql":
            yield AuditReader(self.engine, None, batch)
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                yield AuditReader(self.engine, conn, batch)
