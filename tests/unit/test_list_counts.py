"""`list_sagas` counts per state under every filter but the state one (SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested
from saga_worker.core.stages import WaitFor
from saga_worker.engine import SagaEngine
from saga_worker.store.migrate import upgrade
from saga_worker.testing import RecordingDispatcher


def noop(call: StepInput) -> dict[str, Any]:
    return {}


WAITS = SagaDefinition("waits", [WaitFor("go", signal="go", timeout_seconds=60)])
RUNS = SagaDefinition("runs", [Step("only", noop)])


def test_list_waiting_counts_only_the_waiting_sagas(tmp_path: Path) -> None:
    """The counts (and so `total` and the pages) dropped --waiting: `list --waiting` said
    "page 1 of 1 · 2 sagas" over the one saga it listed."""
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    definitions = {"waits": WAITS, "runs": RUNS}
    engine = SagaEngine(
        client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: definitions[t]
    )
    engine.start(StartRequested("s-wait", "waits", {}))
    engine.start(StartRequested("s-run", "runs", {}))
    page = client.list_sagas(waiting=True)
    assert [s.saga_id for s in page.items] == ["s-wait"]
    assert page.total == 1 and page.counts["RUNNING"] == 1
    assert client.list_sagas().total == 2
