"""`saga-worker versions`: per definition version, what is in flight and who serves it.

On the embedded SQLite database, with sagas written through the real engine and store and
heartbeat rows written as workers write them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import ParkRequested, StartRequested
from saga_worker.core.model import Direction
from saga_worker.engine import SagaEngine
from saga_worker.errors import UnknownDefinitionVersion
from saga_worker.store import workers
from saga_worker.store.migrate import upgrade
from saga_worker.testing import FakeClock, RecordingDispatcher

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


def noop(call: StepInput) -> dict[str, Any]:
    return {}


V1 = SagaDefinition("shop", [Step("pay", noop)], version="1")
V2 = SagaDefinition("shop", [Step("check", noop), Step("pay", noop)], version="2")
BY_VERSION = {"1": V1, "2": V2}


def lookup(saga_type: str, version: str | None) -> SagaDefinition:
    if version is None:
        return V2
    if version not in BY_VERSION:
        raise UnknownDefinitionVersion(saga_type, version, list(BY_VERSION))
    return BY_VERSION[version]


def test_versions_counts_in_flight_per_version_and_names_live_workers(tmp_path: Path) -> None:
    env = {"SAGA_HOME": str(tmp_path)}
    client = SagaClient(Settings.from_env(env))
    upgrade(client.store.engine)
    clock = FakeClock(datetime.now(UTC) - timedelta(hours=2))
    engine = SagaEngine(
        client.store, RecordingDispatcher(), Limits(), clock=clock, definitions=lookup
    )
    for n in range(3):
        engine.start(StartRequested(f"old-{n}", "shop", {}))  # version 2: the newest
    # Version 1 sagas, as an older worker started them.
    old = SagaEngine(
        client.store, RecordingDispatcher(), Limits(), clock=clock, definitions=lambda t, v: V1
    )
    first = clock()
    for n in range(2):
        old.start(StartRequested(f"v1-{n}", "shop", {}))
    clock.advance(3600)
    engine.park(
        "v1-0", ParkRequested(0, Direction.FORWARD, 1, 0, "no live worker has shop version 1")
    )
    now = datetime.now(UTC)
    workers.beat(client.store.engine, "w-new@host", "1f2e", "saga", {("shop", "2")}, now)
    stale = now - timedelta(hours=1)
    workers.beat(client.store.engine, "w-gone@host", "3c4d", "saga", {("shop", "1")}, stale)

    report = client.versions()
    lines = {x.version: x.as_dict() for x in report.lines}
    assert lines["1"] == {
        "saga_type": "shop",
        "version": "1",
        "running": 1,
        "parked": 1,
        "failed": 0,
        "in_flight": 2,
        "oldest_started_at": first.isoformat(),
        "workers": [],  # its worker's heartbeat is an hour old: not live
    }
    assert (lines["2"]["running"], lines["2"]["workers"]) == (3, ["w-new@host"])
    (worker,) = report.workers
    assert (worker["node"], worker["instance"], worker["queue"]) == ("w-new@host", "1f2e", "saga")
    assert worker["versions"] == [{"saga_type": "shop", "version": "2"}]
    assert worker["seen_at"] == worker["started_at"] == now.isoformat()

    # The CLI: a deploy script waits for `--drained` to exit 0.
    cli_env = {**os.environ, **env}
    busy = subprocess.run(
        [SAGA_WORKER, "versions", "--json", "--drained", "shop=1"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert busy.returncode == 1, busy.stderr
    assert json.loads(busy.stdout)["not_drained"] == ["shop=1"]
    done = subprocess.run(
        [SAGA_WORKER, "versions", "--drained", "shop=9"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "w-new@host" in done.stdout and "shop" in done.stdout
    # shop=9: no saga, no live worker has it; drained as far as anyone knows, but a typo?
    assert "warning" in done.stderr and "shop=9" in done.stderr and "mistyped" in done.stderr
    known = subprocess.run(
        [SAGA_WORKER, "versions", "--drained", "shop=2", "--drained", "shop=1"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert known.returncode == 1 and "warning" not in known.stderr, known.stderr
