"""The compliance audit trail on real databases: every event type and its fields, append-only
enforcement by the database, tamper detection, redaction, and a 200k-row streaming export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import saga_worker.examples  # noqa: F401  (registers backtest_workflow in this process)
from saga_worker.audit.chain import GENESIS_HASH, SNAPSHOT_EVENTS, row_hash
from saga_worker.audit.redaction import REDACTED, Redactor
from saga_worker.cli import main
from saga_worker.client import SagaClient
from saga_worker.config import DEFAULT_REDACT_KEYS, Settings
from saga_worker.core.commands import RunAttempt
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition
from saga_worker.core.events import AbortRequested, StartRequested, StepFailed, StepSucceeded
from saga_worker.core.model import Saga, SagaState
from saga_worker.engine import SagaEngine
from saga_worker.recovery import sweep
from saga_worker.store.codec import saga_to_row
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from tests.waiting import wait_for

from .conftest import (
    SIGNING_KEY,
    WORKER_IMPORTS,
    Stack,
    fresh_postgres_database,
    fresh_sqlite_database,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

ALL_EVENT_TYPES = {
    "saga_start",
    "step_start",
    "step_complete",
    "step_failed",
    "step_retry",
    "compensation_start",
    "compensation_retry",
    "compensation_complete",
    "compensation_failed",
    "saga_complete",
    "saga_compensated",
    "saga_failed",
    "abort_requested",
    "saga_aborted",
    "saga_recovered",
    "saga_rejected",
}


# ----------------------------------------------------- sagas built in-process ---


@dataclass
class RecordingDispatcher:
    """Records the attempts the engine would send, sends nothing."""

    sent: list[tuple[str, str, int]] = field(default_factory=list)

    def send(
        self, definition: SagaDefinition, saga: Saga, command: RunAttempt, checkpoint: Any = None
    ) -> None:
        name = definition.task_name(command.step_index, command.direction)
        self.sent.append((saga.saga_id, name, command.attempt))


class Driver:
    """Puts sagas in any state on a real database through the real engine, with no worker.

    Results are fed to `SagaEngine.handle` exactly as step tasks feed them.
    """

    def __init__(self, url: str, *, max_broker_delay_seconds: float = 5.0) -> None:
        self.store = SagaStore(create_db_engine(url), Redactor(DEFAULT_REDACT_KEYS))
        self.dispatcher = RecordingDispatcher()
        self.now = datetime.now(UTC)
        self.engine = SagaEngine(
            self.store,
            self.dispatcher,
            Limits(max_broker_delay_seconds=max_broker_delay_seconds),
            clock=lambda: self.now,
        )

    def start(self, saga_id: str, context: dict[str, Any] | None = None, **fields: Any) -> str:
        fields.setdefault("user_id", "user_123")
        fields.setdefault("ip_address", "192.168.1.1")
        self.engine.start(
            StartRequested(saga_id, "backtest_workflow", context or {"strategy_id": 1}, **fields)
        )
        return saga_id

    def _pending(self, saga_id: str) -> Any:
        saga = self.store.load(saga_id)
        assert saga is not None and saga.pending is not None, saga
        return saga.pending

    def succeed(self, saga_id: str, times: int = 1, **output: Any) -> None:
        for _ in range(times):
            p = self._pending(saga_id)
            self.engine.handle(
                saga_id, StepSucceeded(p.step_index, p.direction, p.number, output, 12.5)
            )

    def fail(self, saga_id: str, times: int = 1, message: str = "boom") -> None:
        for _ in range(times):
            p = self._pending(saga_id)
            self.engine.handle(
                saga_id,
                StepFailed(
                    p.step_index,
                    p.direction,
                    p.number,
                    "RuntimeError",
                    message,
                    stack_trace=f"Traceback (most recent call last):\nRuntimeError: {message}",
                    duration_ms=3.25,
                ),
            )

    def abort(self, saga_id: str, user_id: str = "ops") -> None:
        self.engine.handle(saga_id, AbortRequested("operator test", user_id=user_id))

    def completed(self, saga_id: str, **context: Any) -> str:
        self.start(saga_id, {"strategy_id": 1, **context})
        self.succeed(saga_id, 3)
        return saga_id

    def close(self) -> None:
        self.store.engine.dispose()


def superuser(url: str) -> Any:
    return create_db_engine(url, pool=False)


# --------------------------------------------------- every event, real worker ---


def _rows(stack: Stack, saga_id: str) -> list[dict[str, Any]]:
    return stack.store.audit_trail(saga_id)


def _wait_rows(stack: Stack, saga_id: str, timeout: float = 20) -> list[dict[str, Any]]:
    return wait_for(lambda: _rows(stack, saga_id), timeout, f"audit rows of {saga_id}")


def test_every_event_type_is_written_with_its_fields(stack: Stack) -> None:
    secret_context = {
        "strategy_id": 42,
        "password": "hunter2-SECRET",
        "broker": {"api_key": "k-SECRET-1", "venue": "XLON"},
        "note": "card 4111 1111 1111 1111",
    }
    ok = stack.start("backtest_workflow", secret_context, user_id="user_123", ip_address="::1")
    flaky = stack.start(
        "backtest_workflow",
        {"strategy_id": 3, "flaky_step": {"step": "run_strategy", "failures": 1}},
    )
    failed = stack.start(
        "backtest_workflow",
        {"strategy_id": 11, "fail_step": "save_results", "fail_compensation": "run_strategy"},
    )
    compensated = stack.start("backtest_workflow", {"strategy_id": 7, "fail_step": "run_strategy"})
    aborted = stack.start(
        "backtest_workflow",
        {"strategy_id": 5, "slow_step": {"step": "run_strategy", "seconds": 2}},
    )
    rejected = f"rej-{uuid.uuid4().hex[:8]}"
    stack.start("no_such_saga", {"x": 1}, saga_id=rejected, user_id="u9", ip_address="10.1.1.1")
    # A stalled saga: its first attempt was "lost" (recorded, never sent), long ago.
    driver = Driver(stack.database_url)
    driver.now = datetime.now(UTC) - timedelta(minutes=10)
    stalled = driver.start(f"{stack.backend}-stalled-{uuid.uuid4().hex[:8]}")
    driver.close()

    stack.wait_for_step(aborted, 1)
    stack.send("saga.abort", {"saga_id": aborted, "reason": "client cancel", "user_id": "ops"})

    settings = Settings.from_env(
        {
            "SAGA_DATABASE_URL": stack.database_url,
            "SAGA_BROKER_URL": stack.broker_url,
            "SAGA_QUEUE": stack.queue,
            "SAGA_IMPORTS": WORKER_IMPORTS,
            "SAGA_SIGNING_KEY": SIGNING_KEY,
        }
    )
    client = SagaClient(settings)
    try:
        result = sweep(client.store, client.engine, datetime.now(UTC))
    finally:
        client.close()
    assert result.recovered >= 1

    final = stack.wait_all([ok, flaky, failed, compensated, aborted, stalled], timeout=120)
    assert final[ok].state.value == "COMPLETED"
    assert final[failed].state.value == "FAILED"
    assert final[aborted].state.value == "ABORTED"
    assert final[stalled].state.value == "COMPLETED"
    _wait_rows(stack, rejected)

    sagas = (ok, flaky, failed, compensated, aborted, rejected, stalled)
    rows = {sid: _rows(stack, sid) for sid in sagas}
    by_type: dict[str, list[dict[str, Any]]] = {}
    for saga_rows in rows.values():
        for row in saga_rows:
            by_type.setdefault(row["event_type"], []).append(row)
    assert set(by_type) == ALL_EVENT_TYPES

    for saga_id, saga_rows in rows.items():
        stack.assert_chain_ok(saga_id)
        for row in saga_rows:
            ts = row["timestamp"]
            assert ts.tzinfo is not None and ts.utcoffset() == timedelta(0)
            # Snapshots only on rows of events that start, end or change the saga's context.
            has_snapshot = row["context_snapshot"] is not None
            assert has_snapshot == (row["event_type"] in SNAPSHOT_EVENTS), row["event_type"]
            assert row["saga_state_after"], row["event_type"]
            assert len(row["hash"]) == 64 and len(row["prev_hash"]) == 64
    assert any(r["timestamp"].microsecond for rs in rows.values() for r in rs)

    # who and from where, on every row of a started saga
    assert {(r["user_id"], r["ip_address"]) for r in rows[ok]} == {("user_123", "::1")}
    start = by_type["saga_start"][0]
    assert start["saga_state_before"] is None and start["saga_state_after"] == "RUNNING"
    assert start["event_data"]["saga_type"] == "backtest_workflow"
    for kind in ("step_start", "step_complete", "step_retry", "step_failed"):
        for row in by_type[kind]:
            assert row["step_name"] in ("create_backtest", "run_strategy", "save_results")
            assert row["step_index"] == ["create_backtest", "run_strategy", "save_results"].index(
                row["step_name"]
            )
            assert row["event_data"]["attempt"] >= 1
    for kind in ("step_complete", "compensation_complete"):
        assert all(r["duration_ms"] is not None for r in by_type[kind]), kind
    for kind in ("step_retry", "step_failed", "compensation_retry", "compensation_failed"):
        for row in by_type[kind]:
            assert row["error_message"] and "injected" in row["error_message"], kind
            assert "InjectedFailure" in row["error_stack_trace"], kind
            assert row["duration_ms"] is not None, kind
            assert row["event_data"]["error_type"] == "InjectedFailure", kind
            assert row["retry_count"] is not None, kind
    assert [r["retry_count"] for r in rows[failed] if r["event_type"] == "step_retry"] == [1, 2]
    assert [r["retry_count"] for r in rows[failed] if r["event_type"] == "step_failed"] == [2]
    step_failed = next(r for r in rows[failed] if r["event_type"] == "step_failed")
    assert (step_failed["saga_state_before"], step_failed["saga_state_after"]) == (
        "RUNNING",
        "COMPENSATING",
    )
    retried_start = [
        r["retry_count"]
        for r in rows[flaky]
        if r["event_type"] == "step_start" and r["step_name"] == "run_strategy"
    ]
    assert retried_start == [None, 1]
    for kind, state in (
        ("saga_complete", "COMPLETED"),
        ("saga_compensated", "COMPENSATED"),
        ("saga_failed", "FAILED"),
        ("saga_aborted", "ABORTED"),
    ):
        row = by_type[kind][0]
        assert row["saga_state_after"] == state and row["duration_ms"] > 0
        assert row["saga_state_before"] in ("RUNNING", "COMPENSATING")
        assert "completed_steps" in row["event_data"]
    assert by_type["saga_failed"][0]["event_data"]["failed_compensations"] == ["run_strategy"]
    assert "compensation failed for: run_strategy" in by_type["saga_failed"][0]["error_message"]
    abort = by_type["abort_requested"][0]
    assert abort["user_id"] == "ops" and abort["event_data"]["reason"] == "client cancel"
    assert abort["step_name"] == "run_strategy"
    rejection = by_type["saga_rejected"][0]
    assert "unknown saga_type 'no_such_saga'" in rejection["error_message"]
    assert (rejection["user_id"], rejection["ip_address"]) == ("u9", "10.1.1.1")
    assert rejection["event_data"]["code"] == "unknown_saga_type"
    recovered = by_type["saga_recovered"][0]
    assert recovered["step_name"] == "create_backtest" and recovered["step_index"] == 0
    assert recovered["event_data"]["recoveries"] == 1
    assert recovered["event_data"]["direction"] == "forward"

    # redaction: snapshots of the secret-bearing saga, nested keys and card numbers
    for row in rows[ok]:
        snap = row["context_snapshot"]
        if snap is None:
            continue
        assert snap["password"] == REDACTED
        assert snap["broker"] == {"api_key": REDACTED, "venue": "XLON"}
        assert "4111 1111 1111 1111" not in json.dumps(snap)
    worker_logs = b"".join(w.log_path.read_bytes() for w in stack.workers)
    for secret in (b"hunter2-SECRET", b"k-SECRET-1", b"4111 1111 1111 1111"):
        assert secret not in worker_logs


def test_secrets_in_error_messages_and_traces_are_redacted(pg_admin_url: str) -> None:
    url = fresh_postgres_database(pg_admin_url)
    driver = Driver(url)
    try:
        saga_id = driver.start("redact-1", {"strategy_id": 1, "auth": {"token": "t-123"}})
        driver.fail(saga_id, message="login failed password=hunter2 card 4111111111111111")
        rows = driver.store.audit_trail(saga_id)
    finally:
        driver.close()
    retry = next(r for r in rows if r["event_type"] == "step_retry")
    for column in ("error_message", "error_stack_trace"):
        assert "hunter2" not in retry[column] and "4111111111111111" not in retry[column]
        assert f"password={REDACTED}" in retry[column]
        assert "************1111" in retry[column]
    snapshots = [r["context_snapshot"] for r in rows if r["context_snapshot"] is not None]
    assert snapshots and all(s["auth"] == {"token": REDACTED} for s in snapshots)


# ---------------------------------------------------------------- append-only ---


def test_postgres_refuses_update_delete_truncate_for_app_role_and_owner(
    pg_admin_url: str,
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    role = f"saga_app_{uuid.uuid4().hex[:8]}"
    admin = superuser(url)
    with admin.begin() as conn:
        # The least-privilege role of the migration's docstring.
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'app-pw'"))
        conn.execute(
            text(f"GRANT SELECT, INSERT, UPDATE ON saga_checkpoints, saga_settings TO {role}")
        )
        conn.execute(text(f"GRANT SELECT, INSERT ON saga_audit_logs TO {role}"))
        conn.execute(text(f"GRANT USAGE ON SEQUENCE saga_audit_logs_id_seq TO {role}"))
    base = url.split("://", 1)[1].split("@", 1)[1]
    app_url = f"postgresql+psycopg://{role}:app-pw@{base}"
    try:
        driver = Driver(app_url)
        try:
            driver.completed("append-only-1")  # the app role can run sagas...
            assert len(driver.store.audit_trail("append-only-1")) == 8
        finally:
            driver.close()
        app = superuser(app_url)
        statements = (
            "UPDATE saga_audit_logs SET error_message = 'x'",
            "DELETE FROM saga_audit_logs",
            "TRUNCATE saga_audit_logs",
        )
        for engine, who in ((app, "app role"), (admin, "owner")):
            for statement in statements:
                with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
                    conn.execute(text(statement))
                message = str(caught.value.orig)
                expected = "permission denied" if who == "app role" else "append-only"
                assert expected in message, (who, statement, message)
        app.dispose()
        with admin.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM saga_audit_logs")).scalar() == 8
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_sqlite_refuses_update_and_delete(tmp_path: Path) -> None:
    url = fresh_sqlite_database(tmp_path)
    driver = Driver(url)
    try:
        driver.completed("append-only-sqlite")
        for statement in (
            "UPDATE saga_audit_logs SET error_message = 'x'",
            "DELETE FROM saga_audit_logs",
        ):
            with pytest.raises(DBAPIError, match="append-only"), driver.store.engine.begin() as c:
                c.execute(text(statement))
        assert len(driver.store.audit_trail("append-only-sqlite")) == 8
    finally:
        driver.close()


# ------------------------------------------------------------------ tampering ---


@pytest.fixture(scope="module")
def tampered_db(pg_admin_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Six completed sagas; five tampered by a superuser with the triggers off."""
    url = fresh_postgres_database(pg_admin_url)
    driver = Driver(url)
    ids = {k: driver.completed(f"t-{k}") for k in ("modify", "delete", "tail", "forge", "swap")}
    ids["clean"] = driver.completed("t-clean")
    rows = {k: driver.store.audit_trail(v) for k, v in ids.items()}
    driver.close()
    admin = superuser(url)
    with admin.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        r = rows["modify"][3]
        conn.execute(
            text("UPDATE saga_audit_logs SET duration_ms = 1 WHERE id = :id"), {"id": r["id"]}
        )
        r = rows["delete"][2]
        conn.execute(text("DELETE FROM saga_audit_logs WHERE id = :id"), {"id": r["id"]})
        r = rows["tail"][-1]
        conn.execute(text("DELETE FROM saga_audit_logs WHERE id = :id"), {"id": r["id"]})
        # A forger who knows the recipe: open a gap after row 2, link a row to it.
        forge = rows["forge"]
        conn.execute(
            text("UPDATE saga_audit_logs SET id = id + 100000 WHERE saga_id = :s AND id > :id"),
            {"s": ids["forge"], "id": forge[2]["id"]},
        )
        forged = {k: v for k, v in forge[3].items() if k not in ("id", "hash")}
        forged.update(event_type="step_complete", prev_hash=forge[2]["hash"], duration_ms=1.0)
        forged["hash"] = row_hash(forged)
        forged["event_data"] = json.dumps(forged["event_data"])
        forged["context_snapshot"] = json.dumps(forged["context_snapshot"])
        columns = ", ".join(forged)
        values = ", ".join(f":{k}" for k in forged)
        conn.execute(
            text(f"INSERT INTO saga_audit_logs (id, {columns}) VALUES (:id, {values})"),
            {"id": forge[2]["id"] + 1, **forged},
        )
        a, b = rows["swap"][4]["id"], rows["swap"][5]["id"]
        for old, new in ((a, -1), (b, a), (-1, b)):
            conn.execute(
                text("UPDATE saga_audit_logs SET id = :new WHERE id = :old"),
                {"new": new, "old": old},
            )
    admin.dispose()
    yield url, {"ids": ids, "rows": rows}


def _kinds(problems: list[dict[str, Any]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in problems:
        found.setdefault(p["saga_id"], set()).add(p["kind"])
    return found


EXPECTED_TAMPERING = {
    "t-modify": {"modified"},
    "t-delete": {"broken_link"},
    "t-tail": {"missing_tail"},
    "t-forge": {"broken_link"},
    "t-swap": {"broken_link"},
}


def test_audit_verify_detects_every_tampering_in_the_database(
    tampered_db: tuple[str, dict[str, Any]],
) -> None:
    url, info = tampered_db
    env = {"SAGA_DATABASE_URL": url}
    result = CliRunner().invoke(main, ["audit", "verify", "--json"], env=env)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["sagas"] == 6
    assert _kinds(report["problems"]) == EXPECTED_TAMPERING
    rows = info["rows"]
    modified = [p["row_id"] for p in report["problems"] if p["kind"] == "modified"]
    assert modified == [rows["modify"][3]["id"]]
    swap = sorted(p["row_id"] for p in report["problems"] if p["saga_id"] == "t-swap")
    assert swap == sorted(r["id"] for r in rows["swap"][4:7])

    plain = CliRunner().invoke(main, ["audit", "verify"], env=env)
    assert plain.exit_code == 1
    assert "TAMPERED: 7 problems" in plain.stdout
    assert f"row {rows['modify'][3]['id']} of saga t-modify (step_start): modified" in plain.stdout

    one = CliRunner().invoke(main, ["audit", "verify", "--saga-id", "t-tail"], env=env)
    assert one.exit_code == 1
    assert "were deleted" in one.stdout
    clean = CliRunner().invoke(main, ["audit", "verify", "--saga-id", "t-clean"], env=env)
    assert clean.exit_code == 0 and "OK: 8 rows of 1 sagas" in clean.stdout
    show = CliRunner().invoke(main, ["audit", "show", "t-forge"], env=env)
    assert show.exit_code == 0 and "hash chain: BROKEN" in show.stdout


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_audit_verify_detects_tampering_on_an_export(
    tampered_db: tuple[str, dict[str, Any]], tmp_path: Path, fmt: str
) -> None:
    url, _ = tampered_db
    env = {"SAGA_DATABASE_URL": url}
    path = tmp_path / f"audit.{fmt}"
    exported = CliRunner().invoke(
        main, ["audit", "export", "--format", fmt, "-o", str(path), "--json"], env=env
    )
    assert exported.exit_code == 0, exported.output
    summary = json.loads(exported.stdout)
    assert summary["rows"] == 6 * 8 - 2 + 1 and summary["sagas"] == 6
    result = CliRunner().invoke(main, ["audit", "verify", "--file", str(path), "--json"])
    assert result.exit_code == 1
    # the manifest's heads catch the deleted last row in the file too
    assert _kinds(json.loads(result.stdout)["problems"]) == EXPECTED_TAMPERING


def test_a_clean_export_verifies_and_an_edited_one_does_not(
    pg_admin_url: str, tmp_path: Path
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    driver = Driver(url)
    for i in range(3):
        driver.completed(f"clean-{i}")
    driver.start("clean-running")
    driver.close()
    env = {"SAGA_DATABASE_URL": url}
    path = tmp_path / "audit.jsonl"
    ok = CliRunner().invoke(main, ["audit", "export", "-o", str(path)], env=env)
    assert ok.exit_code == 0 and "exported 26 rows of 4 sagas" in ok.stdout
    manifest = json.loads(path.with_name("audit.jsonl.manifest.json").read_text())
    assert manifest["rows"] == 26 and set(manifest["heads"]) == {
        "clean-0",
        "clean-1",
        "clean-2",
        "clean-running",
    }
    verified = CliRunner().invoke(main, ["audit", "verify", "--file", str(path)])
    assert verified.exit_code == 0 and "OK: 26 rows of 4 sagas" in verified.stdout
    assert CliRunner().invoke(main, ["audit", "verify"], env=env).exit_code == 0
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the file's last row cut off
    cut = CliRunner().invoke(main, ["audit", "verify", "--file", str(path), "--json"])
    assert cut.exit_code == 1
    kinds = {p["kind"] for p in json.loads(cut.stdout)["problems"]}
    assert kinds == {"file_mismatch", "missing_tail"}
    # a range export starts mid-chain and still verifies
    since = CliRunner().invoke(
        main,
        [
            "audit",
            "export",
            "--since",
            "2000-01-01",
            "--saga-type",
            "backtest_workflow",
            "-o",
            str(tmp_path / "since.csv"),
            "--format",
            "csv",
        ],
        env=env,
    )
    assert since.exit_code == 0, since.output
    again = CliRunner().invoke(main, ["audit", "verify", "--file", str(tmp_path / "since.csv")])
    assert again.exit_code == 0, again.output


# -------------------------------------------------------- 200k-row export ---


def _synthetic_sagas(
    start: int, count: int, t0: datetime
) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """`count` completed sagas of 10 rows each, with correct hash chains."""
    rows: list[tuple[Any, ...]] = []
    checkpoints: list[dict[str, Any]] = []
    kinds = ["saga_start"] + ["step_start", "step_complete"] * 4 + ["saga_complete"]
    for n in range(start, start + count):
        saga_id = f"bulk-{n:07d}"
        prev = GENESIS_HASH
        context = {"strategy_id": n, "results": {"trades": n % 17, "returns": [0.1, -0.2, 0.3]}}
        ts = t0 + timedelta(milliseconds=n)
        for i, kind in enumerate(kinds):
            row: dict[str, Any] = {
                "saga_id": saga_id,
                "event_type": kind,
                "step_name": None if kind.startswith("saga") else f"step_{(i - 1) // 2}",
                "step_index": None if kind.startswith("saga") else (i - 1) // 2,
                "event_data": {"attempt": 1, "timeout_seconds": 30.0},
                "context_snapshot": context,
                "error_message": None,
                "error_stack_trace": None,
                "timestamp": ts + timedelta(microseconds=i),
                "duration_ms": 1.5 if kind == "step_complete" else None,
                "user_id": "bulk-user",
                "ip_address": "10.0.0.1",
                "saga_state_before": None if i == 0 else "RUNNING",
                "saga_state_after": "COMPLETED" if kind == "saga_complete" else "RUNNING",
                "retry_count": None,
                "prev_hash": prev,
            }
            row["hash"] = prev = row_hash(row)
            rows.append(tuple(row.values()))
        checkpoints.append(
            {
                **saga_to_row(
                    Saga(
                        saga_id=saga_id,
                        saga_type="bulk",
                        state=SagaState.COMPLETED,
                        context=context,
                        current_step_index=3,
                        total_steps=4,
                        started_at=ts,
                        updated_at=ts,
                        attempts=(),
                    )
                ),
                "version": 9,
                "audit_head": prev,
            }
        )
    return rows, checkpoints


AUDIT_COLUMNS = (
    "saga_id, event_type, step_name, step_index, event_data, context_snapshot, error_message, "
    "error_stack_trace, timestamp, duration_ms, user_id, ip_address, saga_state_before, "
    "saga_state_after, retry_count, prev_hash, hash"
)


def _bulk_insert(url: str, start: int, count: int, t0: datetime) -> None:
    from psycopg.types.json import Json

    rows, checkpoints = _synthetic_sagas(start, count, t0)
    engine = superuser(url)
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert conn is not None
        with conn.cursor() as cur:
            with cur.copy(f"COPY saga_audit_logs ({AUDIT_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(tuple(Json(v) if isinstance(v, dict) else v for v in row))
            columns = list(checkpoints[0])
            with cur.copy(f"COPY saga_checkpoints ({', '.join(columns)}) FROM STDIN") as copy:
                for cp in checkpoints:
                    copy.write_row(
                        tuple(
                            Json(cp[c]) if isinstance(cp[c], dict | list) else cp[c]
                            for c in columns
                        )
                    )
        conn.commit()
    finally:
        raw.close()
        engine.dispose()


# The child reports its own peak: ru_maxrss from wait4 would include the RSS the forked test
# process had before exec, while VmHWM belongs to the memory map exec created.
MEASURED_CLI = (
    "import atexit, os\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            open(os.environ['SAGA_TEST_PEAK_FILE'], 'w').write(line.split()[1])\n"
    "atexit.register(_peak)\n"
    "from saga_worker.cli import run\n"
    "run()\n"
)


def _run_measured(args: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run the CLI as a subprocess: (exit code, peak RSS in MiB, seconds, stdout+stderr)."""
    peak_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"peak-{uuid.uuid4().hex}"
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", MEASURED_CLI, *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO), "SAGA_TEST_PEAK_FILE": str(peak_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
        check=False,
    )
    seconds = time.monotonic() - started
    peak_kib = int(peak_file.read_text())
    peak_file.unlink()
    return completed.returncode, peak_kib / 1024, seconds, completed.stdout.decode()


def test_export_of_200k_rows_keeps_memory_flat_and_round_trips(
    pg_admin_url: str, tmp_path: Path
) -> None:
    url = fresh_postgres_database(pg_admin_url)
    env = {"SAGA_DATABASE_URL": url}
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    figures: dict[str, Any] = {}
    _bulk_insert(url, 0, 2_000, t0)  # 20k rows
    path = tmp_path / "small.jsonl"
    code, rss_20k, secs_20k, out = _run_measured(["audit", "export", "-o", str(path)], env)
    assert code == 0, out
    assert "exported 20000 rows of 2000 sagas" in out
    began = time.monotonic()
    _bulk_insert(url, 2_000, 18_000, t0)  # 200k rows in all
    figures["insert_180k_s"] = round(time.monotonic() - began, 1)
    path = tmp_path / "big.jsonl"
    code, rss_200k, secs_200k, out = _run_measured(["audit", "export", "-o", str(path)], env)
    assert code == 0, out
    assert "exported 200000 rows of 20000 sagas" in out
    code, rss_csv, secs_csv, out = _run_measured(
        ["audit", "export", "--format", "csv", "-o", str(tmp_path / "big.csv")], env
    )
    assert code == 0, out
    code, rss_verify, secs_verify, out = _run_measured(
        ["audit", "verify", "--file", str(path)], env
    )
    assert code == 0, out
    assert "OK: 200000 rows of 20000 sagas" in out
    code, rss_db, secs_db, out = _run_measured(["audit", "verify"], env)
    assert code == 0, out
    figures.update(
        export_20k=(round(rss_20k, 1), round(secs_20k, 1)),
        export_200k=(round(rss_200k, 1), round(secs_200k, 1)),
        export_200k_csv=(round(rss_csv, 1), round(secs_csv, 1)),
        verify_file_200k=(round(rss_verify, 1), round(secs_verify, 1)),
        verify_db_200k=(round(rss_db, 1), round(secs_db, 1)),
        file_mb=round(path.stat().st_size / 2**20, 1),
    )
    print(f"\n[export memory] (peak RSS MiB, seconds): {figures}")
    # Ten times the rows: the peak may grow by the per-saga tails (20k short strings), not
    # by the rows (200k rows hold ~150 MB of JSON).
    assert rss_200k < rss_20k + 20, figures
    assert rss_csv < rss_20k + 20, figures
