"""Adversarial review of issue 15 (definition versions): failing tests for what it found.

Each test states what should hold; the docstring says what goes wrong today.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.engine import SagaEngine
from saga_worker.errors import UnknownDefinitionVersion
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher

ROOT = Path(__file__).resolve().parents[2]


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def shaped(saga_type: str, names: list[str], **kwargs: Any) -> SagaDefinition:
    return SagaDefinition(saga_type, [Step(n, noop, compensate=noop) for n in names], **kwargs)


def engine_with(
    store: InMemoryStore,
    dispatcher: RecordingDispatcher,
    clock: FakeClock,
    versions: list[SagaDefinition],
) -> SagaEngine:
    """An engine whose registry has `versions` (the last is the default), as a worker's."""
    by_version = {d.version: d for d in versions}

    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version is None:
            return versions[-1]
        if version not in by_version:
            raise UnknownDefinitionVersion(saga_type, version, list(by_version))
        return by_version[version]

    return SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )


# -- 3. heartbeat rows are keyed by the Celery node name --------------------------------------


def test_two_workers_with_one_node_name_both_count_as_live(tmp_path: Path) -> None:
    """worker/heartbeat.py keys the saga_workers row by `sender.hostname`, the Celery node
    name (`celery@HOST` unless -n is given). A rolling deploy on one host (start the new
    generation, then warm-stop the old one, both `celery@HOST`) makes the two workers
    overwrite each other's row every 5 s, so the versions of one of them are missing at any
    time (sweeps elsewhere park its sagas, then it resumes them: saga_parked churn), and the
    old worker's warm shutdown deletes the row the new one keeps."""
    from saga_worker.client import SagaClient
    from saga_worker.config import Settings
    from saga_worker.store import workers
    from saga_worker.store.migrate import upgrade

    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    engine = client.store.engine
    now = datetime.now(UTC)
    name = "celery@host-1"
    workers.beat(engine, name, "saga", {("order", "1")}, now, now)  # generation 1
    workers.beat(engine, name, "saga", {("order", "2")}, now, now)  # generation 2, same host
    live = workers.live_versions(engine, now - timedelta(seconds=20))
    assert live == {("order", "1"), ("order", "2")}, f"live versions: {live}"
    workers.forget(engine, name)  # generation 1's warm shutdown
    live = workers.live_versions(engine, now - timedelta(seconds=20))
    assert ("order", "2") in live, "generation 2 is running, but its row was deleted"


# -- 4. heartbeat liveness compares two hosts' clocks -----------------------------------------


def test_a_live_worker_whose_clock_lags_still_counts_as_live(tmp_path: Path) -> None:
    """seen_at is the worker host's clock (heartbeat.py `datetime.now(UTC)`), compared with
    the sweeping host's clock minus 20 s (recovery.py). A worker whose clock is 30 s behind
    never counts as live: every stalled saga of its version is parked by other workers'
    sweeps and resumed by its own, over and over (each a saga_parked + saga_recovered
    audit pair); a clock 30 s ahead keeps a killed worker 'live' for 50 s. The database's
    own now() for both would not depend on host clocks."""
    from saga_worker.client import SagaClient
    from saga_worker.config import Settings
    from saga_worker.store import workers
    from saga_worker.store.migrate import upgrade

    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    engine = client.store.engine
    sweeper_now = datetime.now(UTC)
    lagging_worker_now = sweeper_now - timedelta(seconds=30)
    workers.beat(engine, "w@a", "saga", {("order", "1")}, lagging_worker_now, lagging_worker_now)
    assert ("order", "1") in workers.live_versions(engine, sweeper_now - timedelta(seconds=20))


# -- 6. the docs still send remote results to SAGA_QUEUE --------------------------------------


def test_the_docs_name_the_queue_remote_results_now_go_to() -> None:
    """worker/dispatch.py attaches link/link_error signatures with queue
    `<SAGA_QUEUE>.<type>.<version>`, but docs/contract.md (Remote steps) still says the
    callbacks hand the result to saga.advance 'on SAGA_QUEUE', and docs/rabbitmq.md that
    they 'send each result to the saga queue'. A remote service's broker permissions set up
    from these docs (a Redis ACL or RabbitMQ configure/write regex for `saga` only, as
    users.acl's saga-producer has) now refuse its replies: every remote step stalls."""
    contract = (ROOT / "docs" / "contract.md").read_text()
    rabbit = (ROOT / "docs" / "rabbitmq.md").read_text()
    stale = [
        m.group(0)
        for text in (contract, rabbit)
        for m in re.finditer(
            r"(saga\.advance` on `SAGA_QUEUE`|send each result to the saga queue)", text
        )
    ]
    assert not stale, f"stale claims: {stale}"
