"""An operator's transition counts on the worker's /metrics: `saga-worker abort`, run as its
own process with the worker's SAGA_METRICS_DIR, shows up in what the worker serves, exactly
once, and its files are folded into the worker's archive once it has exited."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.console_script import SAGA_WORKER

from .conftest import SIGNING_KEY, fresh_postgres_database, start_worker
from .test_audit_trail import Driver
from .test_metrics import free_port, sample, scrape, wait_for

pytestmark = pytest.mark.integration

SAGA = "backtest_workflow"


def metric_files(directory: Path, pid: int) -> list[str]:
    return sorted(p.name for p in directory.glob(f"*_{pid}-*.db"))


def test_cli_abort_is_counted_on_the_worker_endpoint(
    broker_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    database_url = fresh_postgres_database(pg_admin_url)
    metrics_dir = tmp_path / "metrics"
    port = free_port()
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": f"it-opmetrics-{uuid.uuid4().hex[:8]}",
        "SAGA_IMPORTS": "saga_worker.examples",
        "SAGA_HOME": str(tmp_path),
        "SAGA_METRICS_DIR": str(metrics_dir),
    }
    # RUNNING, its first attempt recorded as sent but never delivered: nothing but the
    # operator's abort changes it, so every count below is the CLI's.
    driver = Driver(database_url)
    saga_id = driver.start(f"op-{uuid.uuid4().hex[:8]}")
    driver.store.engine.dispose()
    worker = start_worker(
        "saga_worker.app",
        {**env, "SAGA_METRICS_PORT": str(port)},
        env["SAGA_QUEUE"],
        tmp_path / "worker.log",
        concurrency=1,
    )
    try:
        t = {"saga_type": SAGA}
        before = wait_for("the worker's endpoint", lambda: scrape(port), 30, worker.log_tail)
        assert sample(before, "saga_checkpoint_saved_total", **t) == 0
        aborts = {**t, "event_type": "abort_requested"}
        assert sample(before, "saga_audit_log_written_total", **aborts) in (None, 0)

        clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
        cli = subprocess.Popen(
            [SAGA_WORKER, "abort", saga_id, "--reason", "ops test", "--user", "ops", "--json"],
            env={**clean, "SAGA_SIGNING_KEY": SIGNING_KEY, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert json.loads(out)["audit_events"] == ["abort_requested"]
        assert err == ""
        written = metric_files(metrics_dir, cli.pid)
        assert written, sorted(p.name for p in metrics_dir.iterdir())  # the CLI counted there

        for _ in range(2):  # the first scrape folds the exited CLI's files; nothing doubles
            served = scrape(port)
            assert sample(served, "saga_audit_log_written_total", **aborts) == 1
            assert sample(served, "saga_checkpoint_saved_total", **t) == 1
            assert sample(served, "saga_checkpoint_loaded_total", **t) == 1
            assert metric_files(metrics_dir, cli.pid) == []
        assert (metrics_dir / "counter_archive.db").exists()
    finally:
        worker.stop()
    # The directory is the operator's: the worker leaves it, and the next one goes on from it.
    assert (metrics_dir / "counter_archive.db").exists()
