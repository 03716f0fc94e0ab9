"""The saga repository: every write is one transaction holding checkpoint and audit rows."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Float,
    Integer,
    Select,
    create_engine,
    event,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from ..audit.chain import GENESIS_HASH, build_rows
from ..audit.redaction import Redactor
from ..core.model import Saga, SagaState
from ..core.transition import AuditEvent, Decision
from ..errors import ConcurrencyConflict
from .codec import saga_from_row, saga_to_row
from .tables import UTCDateTime, audit_logs, checkpoints, settings_table

log = logging.getLogger(__name__)
T = TypeVar("T")


def create_db_engine(url: str, *, pool: bool = True, pre_ping: bool = False) -> Engine:
    """An engine tuned for this workload: WAL + immediate transactions on SQLite.

    `pre_ping` tests each pooled connection before use, for callers that do not retry a
    connection the server closed (a step's own writes after a database restart).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            poolclass=NullPool,
            hide_parameters=True,
        )
        _sqlite_immediate_transactions(engine)
        return engine
    # Errors quote SQL parameters, which hold saga contexts: keep them out of messages.
    # No pool_pre_ping: it costs a round trip per checkout, and a connection found dead by
    # the real statement raises OperationalError, which retry_transient retries anyway.
    kwargs: dict[str, Any] = {"hide_parameters": True, "pool_pre_ping": pre_ping}
    if not pool:
        kwargs["poolclass"] = NullPool
    else:
        kwargs.update(pool_size=5, max_overflow=5, pool_recycle=1800)
    return create_engine(url, **kwargs)


def _sqlite_immediate_transactions(engine: Engine) -> None:
    # pysqlite's implicit BEGIN is deferred: a read that later writes then fails with
    # "database is locked" instead of waiting. BEGIN IMMEDIATE takes the write lock up front.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: connection lost, server restarting, lock timeout."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read before a step runs, reused by the transition that follows.

    `carried` says it came with the step's message (worker/snapshot.py), not from a read.
    """

    saga: Saga
    audit_head: str
    carried: bool = False


class Applied(NamedTuple):
    """A decided transition: the saga before, the decision, and the checkpoint as committed.

    `committed` (the new saga with its new version and audit head) is None when the
    decision changed nothing.
    """

    before: Saga
    decision: Decision
    committed: Loaded | None


# One statement, one round trip, atomic in autocommit: the checkpoint write (UPDATE guarded
# by the version, or INSERT of a new saga) and the transition's audit rows, inserted only if
# the checkpoint write matched. The rows travel as one JSON array (json_to_recordset). Column
# lists come from the table definitions, so the SQL follows the schema.
def _record_type(column: Any) -> str:
    if isinstance(column.type, JSON):
        # JSON travels as text and is cast back: PostgreSQL cannot turn a \u0000 escape into
        # text, and a context may hold one (json keeps it verbatim).
        return "text"
    if isinstance(column.type, UTCDateTime):
        return "timestamptz"
    if isinstance(column.type, Integer):
        return "int"
    if isinstance(column.type, Float):
        return "float8"
    return "text"


_AUDIT = [c for c in audit_logs.c if c.name != "id"]
_AUDIT_COLUMNS = ", ".join(f'"{c.name}"' for c in _AUDIT)
_AUDIT_SELECT = ", ".join(
    f'"{c.name}"::json' if isinstance(c.type, JSON) else f'"{c.name}"' for c in _AUDIT
)
_AUDIT_RECORD = ", ".join(f'"{c.name}" {_record_type(c)}' for c in _AUDIT)
_CHECKPOINT_JSON = tuple(c.name for c in checkpoints.c if isinstance(c.type, JSON))
_CHECKPOINT_NAMES = [c.name for c in checkpoints.c]
_SET_CHECKPOINT = ", ".join(
    f'"{name}" = %({"new_version" if name == "version" else name})s'
    for name in _CHECKPOINT_NAMES
    if name != "saga_id"
)
_INSERT_VALUES = ", ".join(
    "1" if name == "version" else f"%({name})s" for name in _CHECKPOINT_NAMES
)
_AUDIT_FROM_ROWS = f"""
    INSERT INTO saga_audit_logs ({_AUDIT_COLUMNS})
    SELECT {_AUDIT_SELECT}
    FROM cp, json_to_recordset(%(rows)s::json) AS r({_AUDIT_RECORD})
    RETURNING 1
"""
_UPDATE_AND_AUDIT = f"""
WITH cp AS (
    UPDATE saga_checkpoints SET {_SET_CHECKPOINT}
    WHERE saga_id = %(saga_id)s AND version = %(version)s
    RETURNING 1
), ins AS ({_AUDIT_FROM_ROWS})
SELECT (SELECT count(*) FROM cp)
"""
_INSERT_AND_AUDIT = f"""
WITH cp AS (
    INSERT INTO saga_checkpoints ({", ".join(f'"{n}"' for n in _CHECKPOINT_NAMES)})
    VALUES ({_INSERT_VALUES})
    ON CONFLICT (saga_id) DO NOTHING
    RETURNING 1
), ins AS ({_AUDIT_FROM_ROWS})
SELECT (SELECT count(*) FROM cp)
"""


# The usual start: no audit row exists under the saga_id yet, so the chain starts from the
# genesis hash and no read is needed first. `prior` says when that guess was wrong (a
# rejection wrote rows under this saga_id): nothing is written and the caller reads the head.
def _cast_type(column: Any) -> str:
    # Base types only: a cast to varchar(n) would truncate silently, where the INSERT into
    # the column refuses a value that is too long.
    if isinstance(column.type, JSON):
        return "json"
    if isinstance(column.type, Boolean):
        return "boolean"
    return _record_type(column)


_CAST_VALUES = ", ".join(
    "1" if c.name == "version" else f"%({c.name})s::{_cast_type(c)}" for c in checkpoints.c
)
_INSERT_FIRST_AND_AUDIT = f"""
WITH prior AS (
    SELECT EXISTS (SELECT 1 FROM saga_audit_logs WHERE saga_id = %(saga_id)s) AS found
), cp AS (
    INSERT INTO saga_checkpoints ({", ".join(f'"{n}"' for n in _CHECKPOINT_NAMES)})
    SELECT {_CAST_VALUES} FROM prior WHERE NOT prior.found
    ON CONFLICT (saga_id) DO NOTHING
    RETURNING 1
), ins AS ({_AUDIT_FROM_ROWS})
SELECT (SELECT count(*) FROM cp), (SELECT found FROM prior)
"""


def _checkpoint_params(saga: Saga) -> dict[str, Any]:
    from psycopg.types.json import Json

    params = saga_to_row(saga)
    for column in _CHECKPOINT_JSON:
        if params[column] is not None:
            params[column] = Json(params[column])
    return params


def _rows_json(rows: list[dict[str, Any]]) -> str:
    import json

    from ..audit.chain import iso_utc

    return json.dumps(
        [
            {
                **r,
                "timestamp": iso_utc(r["timestamp"]),
                "event_data": json.dumps(r["event_data"], ensure_ascii=False),
                "context_snapshot": json.dumps(r["context_snapshot"], ensure_ascii=False),
            }
            for r in rows
        ],
        ensure_ascii=False,
    )


def _versioned(after: Saga, before: Saga) -> Saga:
    """The decided saga with the version its write gave it."""
    return replace(after, version=before.version + 1)


class SkippedLocked(Exception):
    """The row is locked by another transaction (another recovery sweep claimed it)."""


class SagaStore:
    """Loads and saves sagas; each public write owns one transaction."""

    def __init__(self, engine: Engine, redactor: Redactor) -> None:
        self.engine = engine
        self.redactor = redactor

    # -- writes -------------------------------------------------------------------------

    def create(self, decision: Decision, now: datetime) -> Loaded | None:
        """Insert a new saga and its first audit rows: the committed checkpoint, or None
        when the saga_id exists."""
        saga = decision.saga
        if self.engine.dialect.name == "postgresql":
            return self._create_pg(decision, now)
        try:
            with self.engine.begin() as conn:
                if self._exists_txn(conn, saga.saga_id):
                    return None
                head = self._audit_head_txn(conn, saga.saga_id)
                rows = build_rows(saga, decision.audit, now, head, self.redactor)
                head = rows[-1]["hash"] if rows else head
                conn.execute(
                    insert(checkpoints).values(**saga_to_row(saga), version=1, audit_head=head)
                )
                if rows:
                    conn.execute(insert(audit_logs), rows)
        except IntegrityError:
            # A concurrent start of the same saga_id won the primary key.
            return None
        return Loaded(replace(saga, version=1), head)

    def _create_pg(self, decision: Decision, now: datetime) -> Loaded | None:
        # One round trip in autocommit (checkpoint and audit rows in one statement) when no
        # audit row exists under this saga_id yet; otherwise (a rejection wrote some) a
        # second one with the chain's head read first.
        saga = decision.saga
        with self._autocommit() as conn:
            rows = build_rows(saga, decision.audit, now, GENESIS_HASH, self.redactor)
            head = rows[-1]["hash"] if rows else GENESIS_HASH
            params = {**_checkpoint_params(saga), "audit_head": head, "rows": _rows_json(rows)}
            created, prior = conn.exec_driver_sql(_INSERT_FIRST_AND_AUDIT, params).one()
            if prior and not created:
                head = self._audit_head_txn(conn, saga.saga_id)
                rows = build_rows(saga, decision.audit, now, head, self.redactor)
                head = rows[-1]["hash"] if rows else head
                params.update(audit_head=head, rows=_rows_json(rows))
                created = conn.exec_driver_sql(_INSERT_AND_AUDIT, params).scalar_one()
        return Loaded(replace(saga, version=1), head) if created else None

    @contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def load_for_step(self, saga_id: str) -> Loaded | None:
        """The checkpoint and its audit head, read in autocommit (one round trip)."""
        with self._autocommit() as conn:
            row = (
                conn.execute(select(checkpoints).where(checkpoints.c.saga_id == saga_id))
                .mappings()
                .first()
            )
        return None if row is None else Loaded(saga_from_row(row), str(row["audit_head"]))

    def apply(
        self,
        saga_id: str,
        decide: Callable[[Saga], Decision],
        now: datetime,
        *,
        skip_locked: bool = False,
        loaded: Loaded | None = None,
    ) -> Applied | None:
        """Load a saga, ask `decide` for a transition, commit it; None when the saga is unknown.

        Raises ConcurrencyConflict when another process committed first: load again.
        With `skip_locked` (the recovery sweep, PostgreSQL only) a row another transaction
        holds is skipped: SkippedLocked is raised and the caller moves on.
        With `loaded` (PostgreSQL), the checkpoint read before the step ran is decided on
        instead of reading it again; the version check of the write catches any change since.
        """
        if self.engine.dialect.name == "postgresql" and not skip_locked:
            return self._apply_pg(saga_id, decide, now, loaded)
        with self.engine.begin() as conn:
            query = select(checkpoints).where(checkpoints.c.saga_id == saga_id)
            if skip_locked and conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            row = conn.execute(query).mappings().first()
            if row is None:
                if skip_locked and self.exists(saga_id):
                    raise SkippedLocked(saga_id)
                return None
            before = saga_from_row(row)
            decision = decide(before)
            if not decision.changed:
                return Applied(before, decision, None)
            rows = build_rows(decision.saga, decision.audit, now, row["audit_head"], self.redactor)
            head = rows[-1]["hash"] if rows else row["audit_head"]
            result = conn.execute(
                update(checkpoints)
                .where(checkpoints.c.saga_id == saga_id, checkpoints.c.version == before.version)
                .values(**saga_to_row(decision.saga), version=before.version + 1, audit_head=head)
            )
            if result.rowcount != 1:
                raise ConcurrencyConflict(f"saga {saga_id} changed concurrently")
            if rows:
                conn.execute(insert(audit_logs), rows)
        return Applied(before, decision, Loaded(_versioned(decision.saga, before), head))

    def _apply_pg(
        self,
        saga_id: str,
        decide: Callable[[Saga], Decision],
        now: datetime,
        loaded: Loaded | None,
    ) -> Applied | None:
        if loaded is None:
            loaded = self.load_for_step(saga_id)
            if loaded is None:
                return None
        before = loaded.saga
        decision = decide(before)
        if not decision.changed:
            return Applied(before, decision, None)
        rows = build_rows(decision.saga, decision.audit, now, loaded.audit_head, self.redactor)
        head = rows[-1]["hash"] if rows else loaded.audit_head
        params = {
            **_checkpoint_params(decision.saga),
            "version": before.version,
            "new_version": before.version + 1,
            "audit_head": head,
            "rows": _rows_json(rows),
        }
        with self._autocommit() as conn:
            updated = conn.exec_driver_sql(_UPDATE_AND_AUDIT, params).scalar_one()
        if updated != 1:
            raise ConcurrencyConflict(f"saga {saga_id} changed concurrently")
        return Applied(before, decision, Loaded(_versioned(decision.saga, before), head))

    def record_rejection(
        self,
        saga_id: str,
        events: tuple[AuditEvent, ...],
        context: Mapping[str, Any],
        now: datetime,
    ) -> bool:
        """Write a `saga_rejected` row for a saga_id that has no checkpoint; False if it has one."""
        with self.engine.begin() as conn:
            if self._exists_txn(conn, saga_id):
                return False
            head = self._audit_head_txn(conn, saga_id)
            stub = Saga(
                saga_id=saga_id,
                saga_type="",
                state=SagaState.FAILED,
                context=context,
                current_step_index=0,
                total_steps=0,
                started_at=now,
                updated_at=now,
                pending=None,
            )
            conn.execute(insert(audit_logs), build_rows(stub, events, now, head, self.redactor))
        return True

    # -- reads --------------------------------------------------------------------------

    def load(self, saga_id: str) -> Saga | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(checkpoints).where(checkpoints.c.saga_id == saga_id))
                .mappings()
                .first()
            )
        return None if row is None else saga_from_row(row)

    def stalled(
        self, now: datetime, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[tuple[str, dict[str, Any], datetime]]:
        """Up to `limit` (saga_id, pending, deadline) whose deadline passed, earliest first.

        `after` is the (deadline, saga_id) of the previous page's last row (keyset paging).
        Reads only the partial deadline index, so the cost follows the number of stalled
        sagas, not the size of the table (tests/integration/test_recovery_index.py).
        """
        with self.engine.connect() as conn:
            rows = conn.execute(stalled_query(now, limit, after)).all()
        return [(r.saga_id, r.pending, r.deadline) for r in rows]

    def exists(self, saga_id: str) -> bool:
        with self.engine.connect() as conn:
            return self._exists_txn(conn, saga_id)

    def audit_trail(self, saga_id: str) -> list[dict[str, Any]]:
        """A saga's audit rows in the order they were written."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(audit_logs).where(audit_logs.c.saga_id == saga_id).order_by(audit_logs.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def iter_audit(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """All audit rows in id order, fetched in batches (keyset pagination)."""
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = [
                    dict(r)
                    for r in conn.execute(
                        select(audit_logs)
                        .where(audit_logs.c.id > last)
                        .order_by(audit_logs.c.id)
                        .limit(batch)
                    ).mappings()
                ]
            if not rows:
                return
            yield from rows
            last = rows[-1]["id"]

    def signing_key(self) -> str:
        """The HMAC key shared by every worker of this database, created on first use."""
        with self.engine.begin() as conn:
            key = conn.execute(
                select(settings_table.c.value).where(settings_table.c.key == "signing_key")
            ).scalar()
            if key is not None:
                return str(key)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(settings_table).values(key="signing_key", value=secrets.token_hex(32))
                )
        except IntegrityError:
            pass  # another process created it first; read theirs
        with self.engine.connect() as conn:
            return str(
                conn.execute(
                    select(settings_table.c.value).where(settings_table.c.key == "signing_key")
                ).scalar_one()
            )

    # -- transaction helpers ------------------------------------------------------------

    @staticmethod
    def _exists_txn(conn: Connection, saga_id: str) -> bool:
        return (
            conn.execute(
                select(checkpoints.c.saga_id).where(checkpoints.c.saga_id == saga_id)
            ).first()
            is not None
        )

    @staticmethod
    def _audit_head_txn(conn: Connection, saga_id: str) -> str:
        # Only starts and rejections look here; a live saga keeps its head on the checkpoint.
        head = conn.execute(
            select(audit_logs.c.hash)
            .where(audit_logs.c.saga_id == saga_id)
            .order_by(audit_logs.c.id.desc())
            .limit(1)
        ).scalar()
        return str(head) if head else GENESIS_HASH

    # -- read-only queries of the operator CLI and the audit export ---------------------

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

    def count_sagas_by_state(self, query: SagaQuery) -> dict[str, int]:
        """How many sagas match `query` in each state (the state filter itself ignored)."""
        unfiltered = SagaQuery(
            saga_type=query.saga_type,
            user_id=query.user_id,
            started_after=query.started_after,
            started_before=query.started_before,
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                _saga_filter(
                    select(checkpoints.c.state, func.count()).group_by(checkpoints.c.state),
                    unfiltered,
                )
            ).all()
        return {str(state): int(count) for state, count in rows}

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


def stalled_query(
    now: datetime, limit: int, after: tuple[datetime, str] | None = None
) -> Select[Any]:
    """The recovery scan: live checkpoints whose deadline passed, by (deadline, saga_id).

    Terminal sagas have no deadline, so the partial index ix_saga_checkpoints_deadline_live
    holds only live ones; the row comparison of a later page is an index condition too.
    """
    query = select(checkpoints.c.saga_id, checkpoints.c.pending, checkpoints.c.deadline).where(
        checkpoints.c.deadline.is_not(None), checkpoints.c.deadline < now
    )
    if after is not None:
        key = (checkpoints.c.deadline, checkpoints.c.saga_id)
        # Typed binds: the deadline must go through UTCDateTime like the column's values.
        query = query.where(tuple_(*key) > tuple_(*after, types=[c.type for c in key]))
    return query.order_by(checkpoints.c.deadline, checkpoints.c.saga_id).limit(limit)


def retry_transient(
    operation: Callable[[], T], *, max_wait_seconds: float = 60.0, what: str = "database call"
) -> T:
    """Run `operation`, retrying transient database errors with capped exponential backoff."""
    delay = 0.1
    waited = 0.0
    while True:
        try:
            return operation()
        except (OperationalError, DBAPIError) as exc:
            if not is_transient(exc) or waited >= max_wait_seconds:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc.orig).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


# -- filters and the streaming audit reader (read-only, used by the CLI and exports) ----


@dataclass(frozen=True)
class SagaQuery:
    """Which checkpoints `list_sagas` returns; every field is optional."""

    states: Sequence[str] = ()
    saga_type: str | None = None
    user_id: str | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None


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
        stmt = _audit_filter(select(audit_logs), query).order_by(audit_logs.c.id)
        if self.conn is not None:
            result = self.conn.execute(stmt.execution_options(yield_per=self.batch))
            try:
                for row in result.mappings():
                    yield dict(row)
            finally:
                result.close()
            return
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
