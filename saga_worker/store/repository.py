"""The saga repository: every write is one transaction holding checkpoint and audit rows."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from ..audit import GENESIS_HASH, Redactor, build_rows
from ..core.model import Saga, SagaState
from ..core.transition import AuditEvent, Decision
from ..errors import ConcurrencyConflict
from .codec import pending_from_json, saga_from_row, saga_to_row
from .tables import audit_logs, checkpoints, settings_table

log = logging.getLogger(__name__)
T = TypeVar("T")


def create_db_engine(url: str, *, pool: bool = True) -> Engine:
    """An engine tuned for this workload: WAL + immediate transactions on SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            poolclass=NullPool,
        )
        _sqlite_immediate_transactions(engine)
        return engine
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
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


class SkippedLocked(Exception):
    """The row is locked by another transaction (another recovery sweep claimed it)."""


class SagaStore:
    """Loads and saves sagas; each public write owns one transaction."""

    def __init__(self, engine: Engine, redactor: Redactor) -> None:
        self.engine = engine
        self.redactor = redactor

    # -- writes -------------------------------------------------------------------------

    def create(self, decision: Decision, now: datetime) -> bool:
        """Insert a new saga and its first audit rows; False when the saga_id exists."""
        saga = decision.saga
        try:
            with self.engine.begin() as conn:
                if self._exists_txn(conn, saga.saga_id):
                    return False
                head = self._audit_head_txn(conn, saga.saga_id)
                rows = build_rows(saga, decision.audit, now, head, self.redactor)
                conn.execute(
                    insert(checkpoints).values(
                        **saga_to_row(saga),
                        version=1,
                        audit_head=rows[-1]["hash"] if rows else head,
                    )
                )
                if rows:
                    conn.execute(insert(audit_logs), rows)
        except IntegrityError:
            # A concurrent start of the same saga_id won the primary key.
            return False
        return True

    def apply(
        self,
        saga_id: str,
        decide: Callable[[Saga], Decision],
        now: datetime,
        *,
        skip_locked: bool = False,
    ) -> tuple[Saga, Decision] | None:
        """Load a saga, ask `decide` for a transition, commit it; None when the saga is unknown.

        Raises ConcurrencyConflict when another process committed first: load again.
        With `skip_locked` (the recovery sweep, PostgreSQL only) a row another transaction
        holds is skipped: SkippedLocked is raised and the caller moves on.
        """
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
                return before, decision
            rows = build_rows(decision.saga, decision.audit, now, row["audit_head"], self.redactor)
            result = conn.execute(
                update(checkpoints)
                .where(checkpoints.c.saga_id == saga_id, checkpoints.c.version == before.version)
                .values(
                    **saga_to_row(decision.saga),
                    version=before.version + 1,
                    audit_head=rows[-1]["hash"] if rows else row["audit_head"],
                )
            )
            if result.rowcount != 1:
                raise ConcurrencyConflict(f"saga {saga_id} changed concurrently")
            if rows:
                conn.execute(insert(audit_logs), rows)
        return before, decision

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

    def pending_key(self, saga_id: str) -> tuple[int, str, int] | None:
        """(step_index, direction, attempt) the saga waits for, or None."""
        with self.engine.connect() as conn:
            data = conn.execute(
                select(checkpoints.c.pending).where(checkpoints.c.saga_id == saga_id)
            ).scalar()
        attempt = pending_from_json(data)
        return (
            None
            if attempt is None
            else (attempt.step_index, attempt.direction.value, attempt.number)
        )

    def stalled(self, now: datetime, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to `limit` (saga_id, pending) whose pending attempt passed its deadline.

        Reads only the partial deadline index, so the cost follows the number of live sagas.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints.c.saga_id, checkpoints.c.pending)
                .where(checkpoints.c.deadline.is_not(None), checkpoints.c.deadline < now)
                .order_by(checkpoints.c.deadline)
                .limit(limit)
            ).all()
        return [(r.saga_id, r.pending) for r in rows]

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
