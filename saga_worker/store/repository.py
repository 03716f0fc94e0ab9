"""The saga repository: load a checkpoint, let the engine decide, commit through `write`.

Each public write owns one transaction (or one autocommit statement on PostgreSQL) and goes
through `write.execute`, the one write path: start, advance, recovery, operator actions and
rejections alike.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from ..audit.chain import GENESIS_HASH, build_rows
from ..audit.redaction import Redactor
from ..core.decision import AuditEvent, Decision
from ..core.model import Saga
from ..errors import ConcurrencyConflict
from . import workers
from .codec import saga_from_row, saga_to_row
from .connect import retry_transient
from .port import Applied, Loaded, SkippedLocked, StalledRow, VersionKey
from .queries import OperatorQueries, stalled_query
from .tables import audit_logs, checkpoints, settings_table
from .write import Write, Written, audit_head, execute

#: Rejections racing on one saga_id: rebuilding from the new head each time settles it.
MAX_HEAD_RETRIES = 10


T = TypeVar("T")


class SagaStore(OperatorQueries):
    """Loads and saves sagas; each public write owns one transaction."""

    def __init__(self, engine: Engine, redactor: Redactor, *, retry_seconds: float = 60.0) -> None:
        self.engine = engine
        self.redactor = redactor
        self.retry_seconds = retry_seconds

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation`, retrying connection errors (a restart, a failover) for up to
        `retry_seconds`; anything else, and the last error, is raised."""
        return retry_transient(operation, max_wait_seconds=self.retry_seconds, what=what)

    @property
    def _pg(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # -- writes -------------------------------------------------------------------------

    def create(self, decision: Decision, now: datetime) -> Loaded | None:
        """Insert a new saga and its first audit rows: the committed checkpoint, or None
        when the saga_id exists."""
        saga = decision.saga

        def build(head: str) -> Write:
            rows = build_rows(saga.saga_id, saga.context, decision.audit, now, head, self.redactor)
            return Write(saga.saga_id, self._checkpoint(saga, rows, head), None, rows, head)

        written = self._write_new(saga.saga_id, build)
        if written is None:
            return None
        return Loaded(replace(saga, version=1), written.head)

    def record_rejection(
        self,
        saga_id: str,
        events: tuple[AuditEvent, ...],
        context: Mapping[str, Any],
        now: datetime,
    ) -> bool:
        """Write a refused start's audit rows for a saga_id without a checkpoint; False (and
        nothing written) if it has one."""

        def build(head: str) -> Write:
            rows = build_rows(saga_id, context, events, now, head, self.redactor)
            return Write(saga_id, None, None, rows, head)

        return self._write_new(saga_id, build) is not None

    def _write_new(self, saga_id: str, build: Callable[[str], Write]) -> Write | None:
        """Write rows chained onto the saga_id's last audit row (a start or a rejection).

        PostgreSQL guesses the usual case, no row yet (one round trip), and rebuilds from the
        real head only when the statement says the chain has rows; elsewhere the head is
        read first in the same transaction.
        """
        if not self._pg:
            with self.engine.begin() as conn:  # BEGIN IMMEDIATE: the head cannot move
                write = build(audit_head(conn, saga_id))
                return write if execute(conn, write) is Written.DONE else None
        with self._autocommit() as conn:
            head = GENESIS_HASH
            for _ in range(MAX_HEAD_RETRIES):
                write = build(head)
                written = execute(conn, write)
                if written is not Written.HEAD_MOVED:
                    return write if written is Written.DONE else None
                head = audit_head(conn, saga_id)  # a rejection wrote rows meanwhile
        raise ConcurrencyConflict(f"the audit chain of {saga_id} kept moving during the write")

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
        if self._pg and not skip_locked:
            # Autocommit: the read and the guarded write are one round trip each.
            current = loaded or self.load_for_step(saga_id)
            if current is None:
                return None
            with self._autocommit() as conn:
                return self._decide_and_write(conn, saga_id, current, decide, now)
        with self.engine.begin() as conn:
            query = select(checkpoints).where(checkpoints.c.saga_id == saga_id)
            if skip_locked and self._pg:
                query = query.with_for_update(skip_locked=True)
            row = conn.execute(query).mappings().first()
            if row is None:
                if skip_locked and self.exists(saga_id):
                    raise SkippedLocked(saga_id)
                return None
            current = Loaded(saga_from_row(row), str(row["audit_head"]))
            return self._decide_and_write(conn, saga_id, current, decide, now)

    def _decide_and_write(
        self,
        conn: Connection,
        saga_id: str,
        current: Loaded,
        decide: Callable[[Saga], Decision],
        now: datetime,
    ) -> Applied:
        before = current.saga
        decision = decide(before)
        if not decision.changed:
            return Applied(before, decision, None)
        saga = decision.saga
        rows = build_rows(
            saga_id, saga.context, decision.audit, now, current.audit_head, self.redactor
        )
        write = Write(
            saga_id,
            self._checkpoint(saga, rows, current.audit_head),
            before.version,
            rows,
            current.audit_head,
        )
        if execute(conn, write) is not Written.DONE:
            raise ConcurrencyConflict(f"saga {saga_id} changed concurrently")
        committed = Loaded(replace(saga, version=before.version + 1), write.head)
        return Applied(before, decision, committed)

    @staticmethod
    def _checkpoint(saga: Saga, rows: list[dict[str, Any]], prev_hash: str) -> dict[str, Any]:
        return {**saga_to_row(saga), "audit_head": rows[-1]["hash"] if rows else prev_hash}

    @contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    # -- reads --------------------------------------------------------------------------

    def load_for_step(self, saga_id: str) -> Loaded | None:
        """The checkpoint and its audit head, read in autocommit (one round trip)."""
        with self._autocommit() as conn:
            row = (
                conn.execute(select(checkpoints).where(checkpoints.c.saga_id == saga_id))
                .mappings()
                .first()
            )
        return None if row is None else Loaded(saga_from_row(row), str(row["audit_head"]))

    def load(self, saga_id: str) -> Saga | None:
        loaded = self.load_for_step(saga_id)
        return None if loaded is None else loaded.saga

    def stalled(
        self, now: datetime, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[StalledRow]:
        """Up to `limit` checkpoints whose deadline passed, earliest first.

        `after` is the (deadline, saga_id) of the previous page's last row (keyset paging).
        Reads only the partial deadline index, so the cost follows the number of stalled
        sagas, not the size of the table (tests/integration/test_recovery_index.py).
        """
        with self.engine.connect() as conn:
            rows = conn.execute(stalled_query(now, limit, after)).all()
        return [StalledRow(*r) for r in rows]

    def parked(self, versions: Collection[VersionKey], limit: int) -> list[str]:
        return workers.parked(self.engine, sorted(versions), limit)

    def live_versions(self, window: timedelta, now: datetime) -> set[VersionKey]:
        return workers.live_versions(self.engine, window, now)

    def exists(self, saga_id: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(checkpoints.c.saga_id).where(checkpoints.c.saga_id == saga_id)
            ).first()
        return found is not None

    def audit_trail(self, saga_id: str) -> list[dict[str, Any]]:
        """A saga's audit rows in the order they were written."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(audit_logs).where(audit_logs.c.saga_id == saga_id).order_by(audit_logs.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def setting(self, name: str) -> str | None:
        """A value of saga_settings, or None."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(settings_table.c.value).where(settings_table.c.key == name)
            ).scalar()
        return None if value is None else str(value)

    def add_setting(self, name: str, value: str) -> str:
        """Store `value` under `name` unless one is there already; returns what is stored."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(settings_table).values(key=name, value=value))
        except IntegrityError:
            pass  # another process stored one first; theirs stands
        stored = self.setting(name)
        assert stored is not None
        return stored

    def remove_setting(self, name: str) -> bool:
        """Delete a saga_settings row (the table owner's privilege); False if there was none."""
        with self.engine.begin() as conn:
            result = conn.execute(delete(settings_table).where(settings_table.c.key == name))
        return bool(result.rowcount)
