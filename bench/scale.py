"""Scale test: the recovery scan and `audit show` against big tables generated with SQL.

The schema comes from saga_worker's own Alembic migration (same indexes and triggers). The
secondary indexes are dropped before the bulk load and rebuilt from the same definitions
afterwards (faster than maintaining them row by row; the result is the same index), then
the tables are vacuumed and analysed as autovacuum would eventually do. The audit chain's
trigger (migration 0002) is off during the load too; the generated rows chain all the same.

Rows of one saga are spread over the audit table (saga = row number mod number of sagas),
the unfavourable layout of many sagas in flight at once: each of a saga's rows sits on its
own heap page.
"""

from __future__ import annotations

import random
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.schema import CreateIndex, DropIndex

from saga_worker.audit.redaction import Redactor
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import audit_logs, checkpoints

DATABASE = "bench_scale"
LIVE_NOT_DUE = 1000  # in-flight sagas whose deadline has not passed: in the index, not due
AUDIT_EVENTS = (
    "saga_start",
    "step_start",
    "step_complete",
    "step_start",
    "step_complete",
    "step_start",
    "step_complete",
    "saga_complete",
    "step_retry",
    "step_start",
)


def run_scale(admin_url: str, sagas: int, stalled: int, audit_rows: int) -> dict[str, Any]:
    url = fresh_database(admin_url)
    engine = create_db_engine(url)
    timings = load(engine, sagas, stalled, audit_rows)
    store = SagaStore(engine, Redactor([]))
    result: dict[str, Any] = {
        "sagas_terminal": sagas,
        "sagas_stalled": stalled,
        "sagas_live_not_due": LIVE_NOT_DUE,
        "audit_rows": audit_rows,
        "setup": timings,
        "sizes": _sizes(engine),
        "recovery_scan": _time_scan(engine, store, stalled),
        "audit_show": _time_audit_show(engine, store, sagas, audit_rows),
    }
    engine.dispose()
    drop_database(admin_url)
    return result


def fresh_database(admin_url: str, name: str = DATABASE) -> str:
    """Drop and create database `name` on the server of `admin_url`, migrated; its URL."""
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    admin = create_db_engine(admin_url, pool=False).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_db_engine(url, pool=False)
    upgrade(engine)
    engine.dispose()
    return url


def drop_database(admin_url: str, name: str = DATABASE) -> None:
    admin = create_db_engine(admin_url, pool=False).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def load(
    engine: Engine,
    sagas: int,
    stalled: int,
    audit_rows: int,
    *,
    checkpoint_columns: dict[str, str] | None = None,
    live_columns: dict[str, str] | None = None,
    audit_extra: list[str] | None = None,
) -> dict[str, float]:
    """Load the checkpoints and the audit rows, then VACUUM ANALYZE; seconds per phase.

    `checkpoint_columns` overrides columns of the sagas 'scale-<g>' (SQL over g, see
    `terminal_columns`), `live_columns` those of the stalled and not-yet-due ones;
    `audit_extra` are more INSERTs run in the audit load.
    """
    timings: dict[str, float] = {}
    began = time.monotonic()
    _load_checkpoints(engine, sagas, stalled, checkpoint_columns or {}, live_columns or {})
    timings["load_checkpoints_s"] = time.monotonic() - began
    began = time.monotonic()
    _load_audit(engine, sagas, audit_rows, audit_extra or [])
    timings["load_audit_s"] = time.monotonic() - began
    began = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE saga_checkpoints"))
        conn.execute(text("VACUUM ANALYZE saga_audit_logs"))
    timings["vacuum_analyze_s"] = time.monotonic() - began
    return timings


def _rebuilding_indexes(
    engine: Engine, table: Any, statements: list[str], params: dict[str, Any]
) -> None:
    """Drop `table`'s secondary indexes, run the load, then create them again."""
    indexes = sorted(table.indexes, key=lambda ix: ix.name)
    with engine.begin() as conn:
        for index in indexes:
            conn.execute(DropIndex(index, if_exists=True))
        for statement in statements:
            conn.execute(text(statement), params)
    for index in indexes:  # one transaction each: a failure names the index
        with engine.begin() as conn:
            conn.execute(CreateIndex(index))


#: A checkpoint row of a stalled or not-yet-due saga: its pending attempt (as the codec writes
#: it) with not_before and deadline given as SQL.
PENDING = (
    "json_build_object('step_index', 1, 'direction', 'forward', 'number', 1, "
    "'not_before', {iso}, 'deadline', {iso_deadline}, "
    "'recoveries', 0, 'held', false)"
)


def terminal_columns() -> dict[str, str]:
    """The columns of saga 'scale-<g>' (COMPLETED, every 50th COMPENSATED), as SQL over g."""
    return {
        "saga_id": "'scale-' || g",
        "saga_type": "'bench_saga'",
        "state": "CASE WHEN g % 50 = 0 THEN 'COMPENSATED' ELSE 'COMPLETED' END",
        "current_step_index": "3",
        "completed_steps": '\'["reserve","compute","record"]\'::json',
        "compensated_steps": "'[]'::json",
        "context": '\'{"n": 1, "a": 2, "b": 4, "c": 7}\'::json',
        "error": "NULL",
        "started_at": "now() - make_interval(secs => g)",
        "updated_at": "now() - make_interval(secs => g) + interval '1 s'",
        "total_steps": "3",
        "retries": "0",
        "user_id": "'user_' || (g % 1000)",
        "ip_address": "'10.0.' || (g % 250) || '.' || (g % 200)",
        "version": "4",
        "pending": "NULL",
        "deadline": "NULL",
        "failed_compensations": "'[]'::json",
        "abort_requested": "false",
        "audit_head": "md5(g::text) || md5((g + 1)::text)",
    }


def _insert(prefix: str, columns: dict[str, str], count: str) -> str:
    values = {**columns, "saga_id": f"'{prefix}-' || g"}
    return (
        f"INSERT INTO saga_checkpoints ({', '.join(values)}) "
        f"SELECT {', '.join(values.values())} FROM generate_series({count}) g"
    )


def _load_checkpoints(
    engine: Engine,
    sagas: int,
    stalled: int,
    overrides: dict[str, str],
    live_overrides: dict[str, str],
) -> None:
    live = {
        **terminal_columns(),
        **live_overrides,
        "state": "'RUNNING'",
        "current_step_index": "1",
        "completed_steps": "'[\"reserve\"]'::json",
    }
    late = "now() - make_interval(mins => g)"
    due = {**live, "pending": PENDING.format(iso=_iso(late), iso_deadline=_iso(late))}
    due["deadline"] = late
    early = "now() + make_interval(hours => 1, secs => g)"
    not_due = {**live, "pending": PENDING.format(iso=_iso("now()"), iso_deadline=_iso(early))}
    not_due["deadline"] = early
    statements = [
        _insert("scale", {**terminal_columns(), **overrides}, "0, :sagas - 1"),
        _insert("stalled", due, "1, :stalled"),
        _insert("live", not_due, "1, :live"),
    ]
    params = {"sagas": sagas, "stalled": stalled, "live": LIVE_NOT_DUE}
    _rebuilding_indexes(engine, checkpoints, statements, params)


def _iso(expression: str) -> str:
    """SQL rendering a timestamptz as the codec writes it (ISO 8601, UTC, +00:00)."""
    return f"to_char(({expression}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"


def _load_audit(engine: Engine, sagas: int, rows: int, extra: list[str]) -> None:
    events = "ARRAY[" + ",".join(f"'{e}'" for e in AUDIT_EVENTS) + "]"
    sql = f"""
        INSERT INTO saga_audit_logs (
            saga_id, event_type, step_name, step_index, event_data, context_snapshot,
            error_message, error_stack_trace, timestamp, duration_ms, user_id, ip_address,
            saga_state_before, saga_state_after, retry_count, prev_hash, hash)
        SELECT
            'scale-' || (g % :sagas),
            ({events})[(g / :sagas) % 10 + 1],
            (ARRAY['reserve','compute','record'])[(g / :sagas) % 3 + 1],
            (g / :sagas) % 3,
            '{{}}'::json,
            '{{"n": 1, "a": 2}}'::json,
            NULL, NULL,
            timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => g / 100.0),
            0.25,
            'user_' || (g % 1000),
            '10.0.0.1',
            'RUNNING', 'RUNNING', 0,
            CASE WHEN g < :sagas THEN repeat('0', 64)
                 ELSE md5((g - :sagas)::text) || md5((g - :sagas + 1)::text) END,
            md5(g::text) || md5((g + 1)::text)
        FROM generate_series(0, :rows - 1) g
        ORDER BY g
    """
    # The chain trigger (migration 0002) checks each row against its saga's latest one, an
    # index lookup per row: off for the bulk load, like the indexes. The rows chain anyway
    # (each prev_hash is the hash of the saga's row before), as the trigger requires.
    trigger = "saga_audit_logs_check_chain"
    statements = [
        f"ALTER TABLE saga_audit_logs DISABLE TRIGGER {trigger}",
        sql,
        *extra,
        f"ALTER TABLE saga_audit_logs ENABLE TRIGGER {trigger}",
    ]
    _rebuilding_indexes(engine, audit_logs, statements, {"sagas": sagas, "rows": rows})


def _sizes(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: int(
                conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar_one()
            )
            for table in ("saga_checkpoints", "saga_audit_logs")
        }


def _time_scan(engine: Engine, store: SagaStore, stalled: int) -> dict[str, Any]:
    """One recovery page (SagaStore.stalled with the sweep's batch size), timed repeatedly."""
    try:
        from saga_worker.recovery import BATCH as batch
    except ImportError:
        batch = 500
    now = datetime.now(UTC)
    first = _timed(lambda: store.stalled(now, batch))
    found = len(store.stalled(now, batch))
    samples = [_timed(lambda: store.stalled(now, batch)) for _ in range(30)]
    return {
        "batch": batch,
        "rows_returned": found,
        "expected_rows": min(stalled, batch),
        "first_ms": first,
        "p50_ms": statistics.median(samples),
        "max_ms": max(samples),
        "target_ms": 50,
        "plan": _plan_of_scan(engine, now, batch),
    }


def _time_audit_show(engine: Engine, store: SagaStore, sagas: int, rows: int) -> dict[str, Any]:
    """SagaStore.audit_trail (what `saga-worker audit show` reads) for random sagas."""
    picks = random.Random(7).sample(range(sagas), 30)
    samples = []
    counts = set()
    for k in picks:
        began = time.perf_counter()
        trail = store.audit_trail(f"scale-{k}")
        samples.append((time.perf_counter() - began) * 1000)
        counts.add(len(trail))
    again = [_timed(lambda k=k: store.audit_trail(f"scale-{k}")) for k in picks]
    return {
        "rows_per_saga": sorted(counts),
        "first_read_p50_ms": statistics.median(samples),
        "first_read_max_ms": max(samples),
        "repeat_p50_ms": statistics.median(again),
        "repeat_max_ms": max(again),
        "target_ms": 20,
        "plan": _explain(
            engine,
            "SELECT * FROM saga_audit_logs WHERE saga_id = %(s)s ORDER BY id",
            {"s": f"scale-{picks[0]}"},
        ),
    }


def _timed(operation: Any) -> float:
    began = time.perf_counter()
    operation()
    return (time.perf_counter() - began) * 1000


def _plan_of_scan(engine: Engine, now: datetime, batch: int) -> list[str]:
    try:
        from saga_worker.store.queries import stalled_query
    except ImportError:
        return ["(stalled_query not importable in this version)"]
    with engine.connect() as conn:
        compiled = stalled_query(now, batch).compile(dialect=conn.dialect)
    return _explain(engine, str(compiled), compiled.params)


def _explain(engine: Engine, sql: str, params: dict[str, Any]) -> list[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).all()
    return [str(r[0]) for r in rows]


if __name__ == "__main__":
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--stalled", type=int, default=100)
    parser.add_argument("--audit", type=int, default=10_000_000)
    args = parser.parse_args()
    print(json.dumps(run_scale(args.url, args.sagas, args.stalled, args.audit), indent=2))
