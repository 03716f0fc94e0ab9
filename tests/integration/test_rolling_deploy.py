"""A rolling deploy with sagas in flight (issue 15, item 5), on PostgreSQL and Redis with
real worker processes.

Generation 1 workers have version 1 of `deploy_order` (reserve, price, ship); generation 2
has version 2 only (price renamed quote, check_risk inserted after it). Both run on one queue
while sagas start; then generation 1 stops with sagas at every step. Its sagas' messages
wait in version 1's queue, expire, and the sweep parks them (no live worker has version 1).
An operator migrates the ones a mapping can move (`--map price=quote`); the rest (waiting
for `ship`, which may have run: check_risk would come after it) are refused, and a
generation 1 worker started again resumes and finishes them. No step ever runs under a
definition its saga does not have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from saga_worker.audit.verify import verify_chain
from saga_worker.core.decision import Limits
from saga_worker.core.events import StartRequested
from saga_worker.engine import SagaEngine
from tests.fixtures.deploy_sagas import V1, V2
from tests.waiting import wait_for

from .conftest import fresh_postgres_database
from .processes import REPO, Rig, unique

pytestmark = pytest.mark.integration

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))
IMPORTS = "tests.fixtures.deploy_sagas"


@pytest.fixture
def rig(pg_admin_url: str, broker_url: str, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        broker_url,
        tmp_path,
        SAGA_IMPORTS=IMPORTS,
        SAGA_STALL_GRACE_SECONDS="1",
        SAGA_RECOVERY_INTERVAL_SECONDS="0.5",
    )
    try:
        yield rig
    finally:
        rig.close()


def start_generation(rig: Rig, generation: str) -> Any:
    rig.env["DEPLOY_GENERATION"] = generation
    return rig.start_worker(concurrency=2)


def versions(rig: Rig) -> dict[str, Any]:
    done = subprocess.run(
        [SAGA_WORKER, "versions", "--json"],
        env={**os.environ, **rig.env},
        capture_output=True,
        text=True,
        check=True,
    )
    return {line["version"]: line for line in json.loads(done.stdout)["versions"]}


def test_two_generations_on_one_queue_never_run_a_step_under_another_version(rig: Rig) -> None:
    runs = rig.folder / "runs.txt"
    runs.touch()
    context = {"runs_file": str(runs)}
    first = start_generation(rig, "1")
    rig.start_beat()
    sagas = [rig.start_saga("deploy_order", context, unique("d1")) for _ in range(8)]
    # Generation 2 comes up beside generation 1; starts now go to either.
    wait_for(lambda: runs.read_text().count("\n") >= 4, 30, "generation 1 to be busy")
    start_generation(rig, "2")
    sagas += [rig.start_saga("deploy_order", context, unique("d2")) for _ in range(8)]
    wait_for(
        lambda: " 2 " in runs.read_text(),
        30,
        "generation 2 to run steps",
        details=rig.worker.log_tail,
    )
    # Generation 1 stops (its whole process group: running steps die with it) while one of
    # its sagas ships and others are still at earlier steps.
    wait_for(lambda: " 1 ship " in runs.read_text(), 30, "a version 1 saga to ship")
    first.stop()
    started = {
        s: rows[0]["event_data"]["definition_version"] for s, rows in rig.audit_rows(sagas).items()
    }
    v1 = sorted(s for s, v in started.items() if v == "1")
    live_v1 = [s for s in rig.load_many(v1) if not s.state.is_terminal]
    assert live_v1, "generation 1 finished everything before it stopped: no saga in flight"

    # With no live worker of version 1, generation 2's sweep parks them (once each).
    def all_parked() -> bool:
        line = versions(rig).get("1", {})
        return bool(line.get("running", 1) == 0 and line.get("parked", 0) == len(live_v1))

    wait_for(all_parked, 60, "version 1's sagas to be parked", details=lambda: str(versions(rig)))
    parked = {s.saga_id: s for s in rig.load_many(v1) if s.parked_at is not None}
    # An operator moves what a mapping can move; the rest is refused, not forced.
    moved = subprocess.run(
        [
            SAGA_WORKER,
            "migrate",
            "--type",
            "deploy_order",
            "--from",
            "1",
            "--to",
            "2",
            "--map",
            "price=quote",
            "--user",
            "ops:alice",
            "--json",
        ],
        env={**os.environ, **rig.env, "DEPLOY_GENERATION": "both", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(moved.stdout)
    assert "results" in report, (moved.returncode, moved.stdout, moved.stderr)
    migrated = {r["saga_id"] for r in report["results"] if r["migrated"]}
    refused = {r["saga_id"] for r in report["results"] if not r["migrated"]}
    assert migrated | refused == set(parked), report
    assert migrated and refused, f"both outcomes expected: {report}"
    for saga_id in refused:
        # Refused only because `ship` may have run, and version 2 runs check_risk first.
        assert parked[saga_id].completed_steps == ("reserve", "price"), report
    # What a migration cannot move, a worker with its version resumes.
    start_generation(rig, "1")
    final = rig.wait_all(sagas, timeout=120)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}, Counter(
        s.state.value for s in final.values()
    )

    # Which definition ran each step: never one the saga did not have at the time. A
    # migrated saga ran its version 1 steps before it was parked, version 2's after.
    trails = rig.audit_rows(sagas)
    lines = [line.split() for line in runs.read_text().splitlines()]
    wrong = []
    for saga_id, version, step, _attempt in lines:
        if saga_id not in migrated:
            ok = version == started[saga_id]
        elif version == "1":
            # Done before it was parked, or the attempt it was parked on (which may have
            # started before its worker stopped).
            at = parked[saga_id]
            ok = step in (*at.completed_steps, V1.steps[at.current_step_index].name)
        else:
            done_before = {"price": "quote"}
            mapped = {done_before.get(n, n) for n in parked[saga_id].completed_steps}
            ok = version == "2" and step not in mapped
        if not ok:
            wrong.append((saga_id, version, step))
    assert wrong == [], wrong
    # Each step ran once, but for the attempt a saga was parked on: a copy may have started
    # on the stopped worker (it died with it), and it runs again when resumed.
    parked_on = {(s, V1.steps[p.current_step_index].name) for s, p in parked.items()}
    runs_of = Counter((saga_id, step) for saga_id, _, step, _ in lines)
    assert [key for key, n in runs_of.items() if n != 1 and key not in parked_on] == []
    assert all(n <= 2 for n in runs_of.values()), runs_of
    for saga_id in migrated:
        kinds = [r["event_type"] for r in trails[saga_id]]
        assert kinds.count("saga_parked") == 1 and kinds.count("saga_migrated") == 1
        row = next(r for r in trails[saga_id] if r["event_type"] == "saga_migrated")
        assert row["user_id"] == "ops:alice"
        assert final[saga_id].definition_version == "2"
    for saga_id, rows in trails.items():
        assert verify_chain(rows) == [], saga_id
    in_flight = len(live_v1)
    print(
        f"\n[rolling deploy] {len(sagas)} sagas ({len(v1)} v1, {len(sagas) - len(v1)} v2), "
        f"{in_flight} v1 in flight at the switch, {len(parked)} parked, "
        f"{len(migrated)} migrated, {len(refused)} resumed by a v1 worker, "
        f"{len(wrong)} wrong-step runs"
    )


class SendNothing:
    """A dispatcher that sends nothing: the saga's first attempt stays in the database."""

    def send(self, definition: Any, saga: Any, command: Any, checkpoint: Any = None) -> None:
        pass


def test_an_abort_reaching_a_worker_without_the_version_is_recorded_and_holds(
    rig: Rig, broker_url: str
) -> None:
    # A version 2 saga, as a generation 2 worker started it before it went away.
    engine = SagaEngine(
        rig.store, SendNothing(), Limits(stall_grace_seconds=1), definitions=lambda t, v: V2
    )
    saga_id = unique("abort")
    context = {"runs_file": str(rig.folder / "runs.txt")}
    assert engine.start(StartRequested(saga_id, "deploy_order", context)).created
    first = start_generation(rig, "1")  # has version 1 only
    rig.producer.send_task(
        "saga.abort",
        kwargs={"saga_id": saga_id, "reason": "customer cancelled", "user_id": "desk:bob"},
        queue=rig.queue,
    )

    def flagged() -> bool:
        saga = rig.store.load(saga_id)
        return saga is not None and saga.abort_requested

    wait_for(flagged, 30, "generation 1 to record the abort", details=first.log_tail)
    row = rig.audit_rows([saga_id])[saga_id][-1]
    assert (row["event_type"], row["user_id"]) == ("abort_requested", "desk:bob")
    client = redis.Redis.from_url(broker_url)
    try:  # nothing forwarded to a queue that may never be consumed
        assert client.llen(f"{rig.queue}.deploy_order.2") == 0
    finally:
        client.close()
    # A generation 2 worker goes on: the stalled attempt is re-sent and reports, and the
    # recorded abort rolls the saga back.
    start_generation(rig, "2")
    rig.start_beat()
    final = rig.wait_all([saga_id], timeout=60)[saga_id]
    assert final.state.value == "ABORTED"
    kinds = [r["event_type"] for r in rig.audit_rows([saga_id])[saga_id]]
    assert kinds.count("abort_requested") == 1 and kinds[-1] == "saga_aborted"
