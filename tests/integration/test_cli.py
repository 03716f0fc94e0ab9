"""`saga-worker` against a real database holding sagas in every state: in-process through
Click's runner, as a subprocess through the console script, and with real workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result

from saga_worker.cli import main
from saga_worker.client import SagaClient
from saga_worker.config import Settings
from tests.waiting import wait_for

from .conftest import REPO, WORKER_IMPORTS, Stack, fresh_postgres_database, fresh_sqlite_database
from .test_audit_trail import Driver, RecordingDispatcher

pytestmark = pytest.mark.integration

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


@pytest.fixture(scope="module")
def states_url(pg_admin_url: str) -> Iterator[str]:
    """A database with one saga in each state (and a stalled and a held one)."""
    url = fresh_postgres_database(pg_admin_url)
    d = Driver(url)
    d.start("st-running", {"strategy_id": 1, "password": "pw-SECRET"}, user_id="trader_1")
    d.now = datetime.now(UTC) - timedelta(minutes=10)
    d.start("st-stalled")
    d.now = datetime.now(UTC)
    d.start("st-compensating")
    d.succeed("st-compensating")
    d.fail("st-compensating", 3)
    d.completed("st-completed")
    d.start("st-compensated")
    d.succeed("st-compensated")
    d.fail("st-compensated", 3)
    d.succeed("st-compensated")
    d.start("st-aborted")
    d.abort("st-aborted")
    d.succeed("st-aborted", 2)
    d.start("st-failed", {"strategy_id": 9, "api_key": "k-SECRET"}, user_id="trader_7")
    d.succeed("st-failed", 2)
    d.fail("st-failed", 3, message="venue down")
    d.fail("st-failed", 3, message="cannot clear results")
    d.succeed("st-failed")
    d.close()
    held = Driver(url, max_broker_delay_seconds=0.0)
    held.start("st-held")
    held.fail("st-held")
    held.close()
    yield url


class Cli:
    """Runs the CLI in-process with a client whose dispatcher records instead of sending."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dispatcher = RecordingDispatcher()
        self.env = {"SAGA_DATABASE_URL": url, "SAGA_IMPORTS": "saga_worker.examples"}

    def factory(self) -> SagaClient:
        settings = Settings.from_env(self.env)
        return SagaClient(settings, dispatcher=self.dispatcher)

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(main, list(args), obj=self.factory, env=self.env)

    def json(self, *args: str, code: int = 0) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == code, result.output
        return json.loads(result.stdout)


@pytest.fixture
def cli(states_url: str) -> Cli:
    return Cli(states_url)


def _driver_saga(url: str, build: Callable[[Driver, str], object]) -> str:
    saga_id = f"x-{uuid.uuid4().hex[:10]}"
    driver = Driver(url)
    try:
        build(driver, saga_id)
    finally:
        driver.close()
    return saga_id


# ------------------------------------------------------------------ status ---


@pytest.mark.parametrize(
    ("saga_id", "state"),
    [
        ("st-running", "RUNNING"),
        ("st-stalled", "RUNNING"),
        ("st-held", "RUNNING"),
        ("st-compensating", "COMPENSATING"),
        ("st-completed", "COMPLETED"),
        ("st-compensated", "COMPENSATED"),
        ("st-aborted", "ABORTED"),
        ("st-failed", "FAILED"),
    ],
)
def test_status_of_every_state(cli: Cli, saga_id: str, state: str) -> None:
    result = cli("status", saga_id)
    assert result.exit_code == 0, result.output
    assert f"state         {state}" in result.stdout
    data = cli.json("status", saga_id)
    assert data["saga_id"] == saga_id and data["state"] == state
    assert set(data) >= {
        "current_step",
        "pending",
        "deadline",
        "stalled",
        "retries",
        "error",
        "context",
        "completed_steps",
        "failed_compensations",
    }
    terminal = state not in ("RUNNING", "COMPENSATING")
    assert (data["pending"] is None) == terminal
    assert data["stalled"] is (saga_id == "st-stalled")


def test_status_shows_attempts_deadline_error_and_redacted_context(cli: Cli) -> None:
    running = cli.json("status", "st-running")
    assert running["current_step"] == "create_backtest"
    assert running["pending"]["attempt"] == 1 and running["pending"]["max_attempts"] == 3
    assert running["context"] == {"strategy_id": 1, "password": "***REDACTED***"}
    text = cli("status", "st-running").stdout
    assert "pw-SECRET" not in text and "1 of 3 (forward)" in text
    assert "deadline" in text and "STALLED" not in text
    assert "STALLED" in cli("status", "st-stalled").stdout
    held = cli.json("status", "st-held")
    assert held["pending"]["held"] is True and held["pending"]["attempt"] == 2
    assert "waiting until" in cli("status", "st-held").stdout
    failed = cli.json("status", "st-failed")
    assert failed["failed_compensations"] == ["run_strategy"]
    assert "compensation failed for: run_strategy" in failed["error"]
    assert failed["context"]["api_key"] == "***REDACTED***"
    compensating = cli.json("status", "st-compensating")
    assert compensating["pending"]["direction"] == "compensate"


def test_status_errors(cli: Cli) -> None:
    missing = cli("status", "no-such-saga")
    assert missing.exit_code == 3
    assert missing.stderr.strip() == "error: no saga with saga_id 'no-such-saga'"
    assert cli.json("status", "no-such-saga", code=3)["error"]["code"] == "saga_not_found"
    bad = cli("status", "not a saga id")
    assert bad.exit_code == 2 and "is not a saga id" in bad.stderr


# -------------------------------------------------------------------- list ---


def test_list_counts_filters_and_pages(cli: Cli) -> None:
    everything = cli.json("list", "--page-size", "100")
    ids = [i["saga_id"] for i in everything["items"]]
    assert set(ids) >= {"st-running", "st-failed", "st-held", "st-completed"}
    assert everything["counts"]["FAILED"] >= 1 and everything["counts"]["RUNNING"] >= 3
    assert everything["total"] == sum(everything["counts"].values())
    started = [i["started_at"] for i in everything["items"]]
    assert started == sorted(started, reverse=True)  # newest first
    failed = cli.json("list", "--state", "failed")
    assert [i["saga_id"] for i in failed["items"]] == ["st-failed"]
    assert failed["total"] == 1 and failed["counts"] == everything["counts"]
    by_user = cli.json("list", "--user", "trader_7")
    assert [i["saga_id"] for i in by_user["items"]] == ["st-failed"]
    two = cli.json("list", "--page-size", "2", "--page", "2")
    assert two["page"] == 2 and len(two["items"]) == 2 and two["items"][0]["saga_id"] == ids[2]
    assert cli.json("list", "--since", "1h", "--until", "now")["total"] >= 7
    assert cli.json("list", "--until", "2000-01-01")["items"] == []
    table = cli("list", "--state", "RUNNING", "--state", "COMPENSATING")
    assert table.exit_code == 0
    assert "SAGA ID" in table.stdout and "st-compensating" in table.stdout
    assert "st-completed" not in table.stdout
    assert "page 1 of 1" in table.stdout and "FAILED 1" in table.stdout


def test_list_rejects_bad_filters_in_one_line(cli: Cli) -> None:
    for args, message in (
        (["--state", "BROKEN"], "unknown state 'BROKEN'"),
        (["--page", "0"], "page must be 1 or more"),
        (["--page-size", "9999"], "page size must be 1-500"),
        (["--since", "now", "--until", "1d"], "must be before --until"),
    ):
        result = cli("list", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- audit ---


def test_audit_show_timeline(cli: Cli) -> None:
    result = cli("audit", "show", "st-failed")
    assert result.exit_code == 0, result.output
    for text in ("compensation_failed", "1:run_strategy", "RUNNING -> COMPENSATING", "venue down"):
        assert text in result.stdout
    assert "hash chain: intact" in result.stdout
    data = cli.json("audit", "show", "st-failed")
    assert data["chain_ok"] is True
    kinds = [e["event_type"] for e in data["events"]]
    assert kinds[0] == "saga_start" and kinds[-1] == "saga_failed"
    assert all(len(e["hash"]) == 64 for e in data["events"])
    assert cli("audit", "show", "nope").exit_code == 3


def test_audit_export_and_verify_on_the_states_database(cli: Cli, tmp_path: Path) -> None:
    assert cli.json("audit", "verify")["ok"] is True
    out = tmp_path / "a.csv"
    exported = cli("audit", "export", "--format", "csv", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    assert cli("audit", "verify", "--file", str(out)).exit_code == 0
    bad = cli("audit", "verify", "--file", str(tmp_path / "missing.jsonl"))
    assert bad.exit_code == 2


# ------------------------------------------------------------- retry/abort ---


def _events(url: str, saga_id: str) -> list[dict[str, Any]]:
    driver = Driver(url)
    try:
        return driver.store.audit_trail(saga_id)
    finally:
        driver.close()


def test_retry_refuses_what_has_nothing_to_retry(cli: Cli) -> None:
    done = cli("retry", "st-completed")
    assert done.exit_code == 4 and "only FAILED or stalled sagas" in done.stderr
    live = cli("retry", "st-running")
    assert live.exit_code == 4 and "not stalled" in live.stderr and "--force" in live.stderr
    assert cli("retry", "ghost").exit_code == 3


def test_retry_of_a_stalled_saga_resends_its_attempt_and_audits_who(states_url: str) -> None:
    cli = Cli(states_url)

    def stalled(d: Driver, saga_id: str) -> None:
        d.now = datetime.now(UTC) - timedelta(minutes=10)
        d.start(saga_id)

    saga_id = _driver_saga(states_url, stalled)
    data = cli.json("retry", saga_id, "--user", "alice")
    assert data["audit_events"] == ["saga_recovered", "step_start"]
    assert data["sent"] == ["saga.backtest_workflow.create_backtest"]
    assert cli.dispatcher.sent == [(saga_id, "saga.backtest_workflow.create_backtest", 1)]
    recovered = [r for r in _events(states_url, saga_id) if r["event_type"] == "saga_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["user_id"] == "alice"
    assert recovered[0]["event_data"]["operator_retry"] is True
    assert recovered[0]["event_data"]["held"] is False
    status = cli.json("status", saga_id)
    assert status["stalled"] is False and status["pending"]["recoveries"] == 1


def test_retry_of_a_held_attempt_sends_it_now(states_url: str) -> None:
    cli = Cli(states_url)
    driver = Driver(states_url, max_broker_delay_seconds=0.0)
    saga_id = f"x-held-{uuid.uuid4().hex[:8]}"
    driver.start(saga_id)
    driver.fail(saga_id)
    driver.close()
    result = cli("retry", saga_id, "--user", "bob")
    assert result.exit_code == 0, result.output
    assert "saga_recovered, step_start" in result.stdout
    rows = _events(states_url, saga_id)
    assert [r["event_type"] for r in rows[-2:]] == ["saga_recovered", "step_start"]
    assert rows[-2]["user_id"] == "bob" and rows[-2]["event_data"]["held"] is True
    assert cli.json("status", saga_id)["pending"]["held"] is False


def test_retry_force_resends_a_live_attempt(states_url: str) -> None:
    cli = Cli(states_url)
    saga_id = _driver_saga(states_url, lambda d, s: d.start(s))
    assert cli("retry", saga_id).exit_code == 4
    assert cli("retry", saga_id, "--force", "--user", "carol").exit_code == 0
    assert _events(states_url, saga_id)[-2]["user_id"] == "carol"


def test_retry_of_a_failed_saga_reruns_its_failed_compensations(states_url: str) -> None:
    cli = Cli(states_url)

    def failed(d: Driver, saga_id: str) -> None:
        d.start(saga_id)
        d.succeed(saga_id, 2)
        d.fail(saga_id, 3)  # save_results fails for good
        d.fail(saga_id, 3)  # run_strategy's compensation fails for good
        d.succeed(saga_id)  # create_backtest's compensation succeeds

    saga_id = _driver_saga(states_url, failed)
    data = cli.json("retry", saga_id, "--user", "dave", "--reason", "venue fixed")
    assert data["state_before"] == "FAILED" and data["state_after"] == "COMPENSATING"
    assert data["sent"] == ["saga.backtest_workflow.run_strategy.compensate"]
    driver = Driver(states_url)
    driver.succeed(saga_id)  # the re-run compensation succeeds this time
    saga = driver.store.load(saga_id)
    driver.close()
    assert saga is not None and saga.state.value == "COMPENSATED"
    assert saga.compensated_steps == ("create_backtest", "run_strategy")
    rows = _events(states_url, saga_id)
    restart = next(r for r in rows if r["event_data"].get("operator_retry"))
    assert restart["event_type"] == "compensation_start" and restart["user_id"] == "dave"
    assert restart["saga_state_before"] == "FAILED"
    # Every operator retry names the host it came from, a FAILED saga's as a stalled one's.
    assert restart["event_data"]["reason"] == f"venue fixed (from {socket.gethostname()})"
    assert rows[-1]["event_type"] == "saga_compensated"
    assert cli("retry", saga_id).exit_code == 4  # nothing left to retry


def test_abort_records_the_request_and_rolls_back(states_url: str) -> None:
    cli = Cli(states_url)
    saga_id = _driver_saga(states_url, lambda d, s: d.start(s))
    data = cli.json("abort", saga_id, "--reason", "client cancel", "--user", "erin")
    assert data["audit_events"] == ["abort_requested"]
    assert data["state_after"] == "RUNNING"  # the attempt in flight reports first
    row = _events(states_url, saga_id)[-1]
    assert row["event_type"] == "abort_requested" and row["user_id"] == "erin"
    assert row["event_data"]["reason"] == "client cancel"
    assert cli.json("status", saga_id)["abort_requested"] is True
    again = cli("abort", saga_id, "--reason", "twice")
    assert again.exit_code == 4 and "already requested" in again.stderr
    # A saga waiting in a retry backoff has nothing in flight: it ends at once.
    held = Driver(states_url, max_broker_delay_seconds=0.0)
    held_id = f"x-held-{uuid.uuid4().hex[:8]}"
    held.start(held_id)
    held.fail(held_id)
    held.close()
    result = cli.json("abort", held_id, "--reason", "stop")
    assert result["state_after"] == "ABORTED"
    assert result["audit_events"] == ["abort_requested", "saga_aborted"]
    ended = cli("abort", "st-completed", "--reason", "late")
    assert ended.exit_code == 4 and "already COMPLETED" in ended.stderr
    assert cli("abort", "st-running").exit_code == 2  # --reason is required
    long_reason = cli("abort", "st-running", "--reason", "x" * 2001)
    assert long_reason.exit_code == 2 and "reason" in long_reason.stderr


# -------------------------------------------------------------- subprocess ---


def _run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SAGA_WORKER, *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_console_script_subprocess(states_url: str) -> None:
    env = {"SAGA_DATABASE_URL": states_url, "SAGA_IMPORTS": "saga_worker.examples"}
    status = _run(["status", "st-failed", "--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "FAILED"
    listing = _run(["list", "--state", "FAILED"], env)
    assert listing.returncode == 0 and "st-failed" in listing.stdout
    assert "\x1b[" not in listing.stdout  # not a terminal: plain text
    missing = _run(["audit", "show", "nope"], env)
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    bad = _run(["list", "--state", "nope"], env)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: unknown state 'nope'; use one of RUNNING, COMPENSATING, COMPLETED, "
        "COMPENSATED, ABORTED, FAILED"
    )
    down = _run(["status", "x"], {"SAGA_DATABASE_URL": "postgresql+psycopg://u:pw9@127.0.0.1:1/d"})
    assert down.returncode == 5 and "pw9" not in down.stderr and "Traceback" not in down.stderr
    verify = _run(["audit", "verify"], env)
    assert verify.returncode == 0 and "OK:" in verify.stdout


# ----------------------------------------------------- with a real worker ---


def _stack_env(stack: Stack) -> dict[str, str]:
    return {
        "SAGA_DATABASE_URL": stack.database_url,
        "SAGA_BROKER_URL": stack.broker_url,
        "SAGA_QUEUE": stack.queue,
        "SAGA_IMPORTS": WORKER_IMPORTS,
        "IT_REMOTE_QUEUE": stack.remote_queue,
    }


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_retry_resends_a_lost_attempt_to_a_real_worker(stack: Stack) -> None:

    def started_long_ago(driver: Driver, saga_id: str) -> None:
        driver.now = datetime.now(UTC) - timedelta(minutes=10)
        driver.start(saga_id)

    saga_id = _driver_saga(stack.database_url, started_long_ago)
    result = _run(["retry", saga_id, "--user", "oncall", "--json"], _stack_env(stack))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sent"] == ["saga.backtest_workflow.create_backtest"]
    saga = stack.wait(saga_id, timeout=60)
    assert saga.state.value == "COMPLETED"
    kinds = stack.events(saga_id)
    assert kinds[:3] == ["saga_start", "step_start", "saga_recovered"]
    assert kinds[-1] == "saga_complete"
    stack.assert_chain_ok(saga_id)


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_abort_from_the_cli_rolls_back_on_a_real_worker(stack: Stack) -> None:
    saga_id = stack.start(
        "backtest_workflow", {"strategy_id": 4, "slow_step": {"step": "run_strategy", "seconds": 2}}
    )
    stack.wait_for_step(saga_id, 1)
    result = _run(["abort", saga_id, "--reason", "risk limit", "--user", "ops"], _stack_env(stack))
    assert result.returncode == 0, result.stderr
    assert "abort_requested" in result.stdout
    saga = stack.wait(saga_id, timeout=60)
    assert saga.state.value == "ABORTED"
    rows = stack.store.audit_trail(saga_id)
    abort = next(r for r in rows if r["event_type"] == "abort_requested")
    assert abort["user_id"] == "ops" and abort["event_data"]["reason"] == "risk limit"
    assert stack.example_row(saga_id) is None


def test_worker_and_beat_wrappers_start_celery(
    broker_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = fresh_sqlite_database(tmp_path)
    queue = f"it-cli-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(tmp_path),
        "SAGA_RECOVERY_INTERVAL_SECONDS": "1",
        "PYTHONPATH": str(REPO),
    }
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [
            SAGA_WORKER,
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{queue}@%h",
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    beat_log = tmp_path / "beat.log"
    beat = subprocess.Popen(
        [SAGA_WORKER, "beat", "--loglevel", "INFO"],
        env=env,
        stdout=beat_log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: worker.poll() is None and b" ready." in log.read_bytes(),
            60,
            "the worker to be ready",
            details=log.read_text,
        )
        producer = Celery("it-cli", broker=broker_url, set_as_current=False)
        producer.send_task(
            "saga.start",
            kwargs={
                "saga_type": "backtest_workflow",
                "context": {"strategy_id": 2},
                "saga_id": "via-wrapper",
            },
            queue=queue,
        )
        producer.close()
        client = SagaClient(Settings.from_env({"SAGA_DATABASE_URL": url}))
        final = client.wait_terminal(["via-wrapper"], timeout=60)["via-wrapper"]
        client.close()
        assert final is not None and final.state.value == "COMPLETED"
        wait_for(
            lambda: beat.poll() is None and b"saga-recover" in beat_log.read_bytes(),
            30,
            "the beat to send saga.recover",
            details=beat_log.read_text,
        )
        assert (tmp_path / "celerybeat-schedule").exists() or any(
            p.name.startswith("celerybeat-schedule") for p in tmp_path.iterdir()
        )
    finally:
        for process in (worker, beat):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
