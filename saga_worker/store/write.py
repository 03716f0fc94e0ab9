"""The one write path: a checkpoint and its audit rows, committed together or not at all.

Every caller (start, advance, recovery, operator actions, rejections) describes what it
writes as a `Write` and hands it to `execute`, which has one implementation per database:

- PostgreSQL: one statement, built here from the table definitions, in which the audit rows
  are inserted only if the checkpoint write matched (CTEs; the rows travel as one JSON array
  through json_to_recordset). One round trip, atomic even in autocommit.
- Any other database (SQLite): the same three guarded writes in SQLAlchemy Core, inside the
  caller's transaction.

The guards make a write all-or-nothing without a prior read: a new saga is inserted only
where no checkpoint exists and the audit chain's head is the one its rows were chained from;
an update only where the version is the one decided on; rejection rows only where no
checkpoint exists. The version guard holds against concurrent writers (the UPDATE waits for
the row). The other two read the statement's snapshot, which cannot see a concurrent writer
that has not committed yet: there the database's chain trigger (migration 0002) decides. It
serializes the writers of one saga and refuses a row whose prev_hash is not the saga's
latest hash with SQLSTATE CHAIN_SQLSTATE, which `execute` reports as HEAD_MOVED (a start or
a rejection: read the head, build the rows again) or CONFLICT (an update: reload). It is
never a transient error (tests/integration/test_write_races.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Boolean, Connection, Float, Integer, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..audit.chain import GENESIS_HASH, iso_utc
from .codec import WRITE_ONCE_COLUMNS
from .connect import compact_json
from .tables import UTCDateTime, audit_logs, checkpoints

#: SQLSTATE of the chain trigger's refusal (class 23, integrity constraint violation: the
#: driver raises IntegrityError, which no retry treats as transient).
CHAIN_SQLSTATE = "23SW1"


@dataclass(frozen=True)
class Write:
    """What one transaction writes for one saga.

    `checkpoint` is the row to write (without `version`), or None for audit rows alone (a
    refused start: no saga exists). `version` is the version the update replaces; None
    inserts a new saga at version 1 (an update leaves `WRITE_ONCE_COLUMNS` as they are).
    `prev_hash` is the chain head `rows` were built on.
    """

    saga_id: str
    checkpoint: Mapping[str, Any] | None
    version: int | None
    rows: Sequence[Mapping[str, Any]]
    prev_hash: str

    @property
    def head(self) -> str:
        """The chain head after this write: its last row's hash."""
        return str(self.rows[-1]["hash"]) if self.rows else self.prev_hash


class Written(Enum):
    """How `execute` went."""

    #: Checkpoint (if any) and rows committed.
    DONE = "done"
    #: The checkpoint was not where the write expected it: the version moved (an update), a
    #: saga with that id exists (an insert or a rejection). Nothing was written.
    CONFLICT = "conflict"
    #: Audit rows exist under this saga_id beyond `prev_hash` (an insert or a rejection):
    #: nothing was written; read the head and build the rows again.
    HEAD_MOVED = "head_moved"


def execute(conn: Connection, write: Write) -> Written:
    """Commit `write` on `conn` (in its transaction, or alone in autocommit on PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        return _execute_pg(conn, write)
    return _execute_generic(conn, write)


def audit_head(conn: Connection, saga_id: str) -> str:
    """The hash of the saga_id's last audit row, or the genesis hash when it has none.

    Only writes without a checkpoint to read it from need this (starts and rejections).
    """
    head = conn.execute(
        select(audit_logs.c.hash)
        .where(audit_logs.c.saga_id == saga_id)
        .order_by(audit_logs.c.id.desc())
        .limit(1)
    ).scalar()
    return str(head) if head else GENESIS_HASH


# -- any database: SQLAlchemy Core in the caller's transaction ---------------------------


def _execute_generic(conn: Connection, write: Write) -> Written:
    if write.version is None:
        # A new saga, or rejection rows: both only where no checkpoint exists.
        found = conn.execute(
            select(checkpoints.c.saga_id).where(checkpoints.c.saga_id == write.saga_id)
        ).first()
        if found is not None:
            return Written.CONFLICT
        if audit_head(conn, write.saga_id) != write.prev_hash:
            return Written.HEAD_MOVED
        if write.checkpoint is not None:
            try:
                with conn.begin_nested():
                    conn.execute(insert(checkpoints).values(**write.checkpoint, version=1))
            except IntegrityError:
                return Written.CONFLICT  # a concurrent start of the same saga_id won
    else:
        assert write.checkpoint is not None
        changed = {k: v for k, v in write.checkpoint.items() if k not in WRITE_ONCE_COLUMNS}
        result = conn.execute(
            update(checkpoints)
            .where(checkpoints.c.saga_id == write.saga_id, checkpoints.c.version == write.version)
            .values(**changed, version=write.version + 1)
        )
        if result.rowcount != 1:
            return Written.CONFLICT
    if write.rows:
        conn.execute(insert(audit_logs), [dict(r) for r in write.rows])
    return Written.DONE


# -- PostgreSQL: one statement built from the table definitions --------------------------


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


def _cast_type(column: Any) -> str:
    # Base types only: a cast to varchar(n) would truncate silently, where the INSERT into
    # the column refuses a value that is too long.
    if isinstance(column.type, JSON):
        return "json"
    if isinstance(column.type, Boolean):
        return "boolean"
    return _record_type(column)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


_AUDIT = [c for c in audit_logs.c if c.name != "id"]
_CHECKPOINT_NAMES = [c.name for c in checkpoints.c]
_CHECKPOINT_JSON = tuple(c.name for c in checkpoints.c if isinstance(c.type, JSON))

# The chain guard of writes that start from the saga_id's last audit row (or genesis).
_PRIOR = f"""
prior AS (
    SELECT coalesce(
        (SELECT hash FROM saga_audit_logs WHERE saga_id = %(saga_id)s ORDER BY id DESC LIMIT 1),
        '{GENESIS_HASH}'
    ) = %(prev_hash)s AS ok
)"""
_INSERT_CHECKPOINT = f"""
cp AS (
    INSERT INTO saga_checkpoints ({_quoted(_CHECKPOINT_NAMES)})
    SELECT {
    ", ".join(
        "1" if c.name == "version" else f"%({c.name})s::{_cast_type(c)}" for c in checkpoints.c
    )
}
    FROM prior WHERE prior.ok
    ON CONFLICT (saga_id) DO NOTHING
    RETURNING 1
)"""
_UPDATE_CHECKPOINT = f"""
prior AS (SELECT true AS ok),
cp AS (
    UPDATE saga_checkpoints SET {
    ", ".join(
        f'"{n}" = %({"new_version" if n == "version" else n})s'
        for n in _CHECKPOINT_NAMES
        if n != "saga_id" and n not in WRITE_ONCE_COLUMNS
    )
}
    WHERE saga_id = %(saga_id)s AND version = %(version)s
    RETURNING 1
)"""
_NO_CHECKPOINT = """
cp AS (
    SELECT 1 FROM prior
    WHERE prior.ok
      AND NOT EXISTS (SELECT 1 FROM saga_checkpoints WHERE saga_id = %(saga_id)s)
)"""
_INSERT_ROWS = f"""
ins AS (
    INSERT INTO saga_audit_logs ({_quoted([c.name for c in _AUDIT])})
    SELECT {
    ", ".join(f'"{c.name}"::json' if isinstance(c.type, JSON) else f'"{c.name}"' for c in _AUDIT)
}
    FROM cp, json_to_recordset(%(rows)s::json)
         AS r({", ".join(f'"{c.name}" {_record_type(c)}' for c in _AUDIT)})
    RETURNING 1
)"""
_RESULT = "SELECT (SELECT count(*) FROM cp), (SELECT ok FROM prior)"

_STATEMENTS = {
    "insert": f"WITH {_PRIOR}, {_INSERT_CHECKPOINT}, {_INSERT_ROWS} {_RESULT}",
    "update": f"WITH {_UPDATE_CHECKPOINT}, {_INSERT_ROWS} {_RESULT}",
    "rows": f"WITH {_PRIOR}, {_NO_CHECKPOINT}, {_INSERT_ROWS} {_RESULT}",
}


def _execute_pg(conn: Connection, write: Write) -> Written:
    from psycopg.types.json import Json

    params: dict[str, Any] = {
        "saga_id": write.saga_id,
        "prev_hash": write.prev_hash,
        "rows": _rows_json(write.rows),
    }
    if write.checkpoint is None:
        kind = "rows"
    else:
        kind = "insert" if write.version is None else "update"
        params.update(
            write.checkpoint
            if kind == "insert"
            else {k: v for k, v in write.checkpoint.items() if k not in WRITE_ONCE_COLUMNS}
        )
        for column in _CHECKPOINT_JSON:
            if params.get(column) is not None:
                params[column] = Json(params[column], dumps=compact_json)
        if write.version is not None:
            params.update(version=write.version, new_version=write.version + 1)
    try:
        matched, head_ok = conn.exec_driver_sql(_STATEMENTS[kind], params).one()
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != CHAIN_SQLSTATE:
            raise
        # A concurrent writer's rows committed after this statement's snapshot was taken.
        return Written.CONFLICT if kind == "update" else Written.HEAD_MOVED
    if matched:
        return Written.DONE
    return Written.CONFLICT if head_ok else Written.HEAD_MOVED


def _rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(
        [
            {
                **r,
                "timestamp": iso_utc(r["timestamp"]),
                "event_data": json.dumps(
                    r["event_data"], ensure_ascii=False, separators=(",", ":")
                ),
                "context_snapshot": json.dumps(
                    r["context_snapshot"], ensure_ascii=False, separators=(",", ":")
                ),
            }
            for r in rows
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )
