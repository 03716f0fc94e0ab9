"""Business keys stored and found (issue 17): the column, the codec, the step message's
carried checkpoint, `list_sagas(business_key=...)`, `saga-worker list --key` and `status`, on
the embedded SQLite database (PostgreSQL: tests/integration/test_console_foundations.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, select

from saga_worker.cli import main
from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.core.transition import transition
from saga_worker.engine import SagaEngine
from saga_worker.errors import InvalidFilter
from saga_worker.store.codec import saga_from_row, saga_to_row
from saga_worker.store.migrate import upgrade
from saga_worker.store.port import Loaded
from saga_worker.store.tables import checkpoints
from saga_worker.testing import RecordingDispatcher
from saga_worker.worker import snapshot

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def noop(call: StepInput) -> dict[str, Any]:
    return {}


ORDERS = SagaDefinition(
    "keyed_orders", [Step("reserve", noop), Step("ship", noop)], business_key="order_id"
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def client(home: Path) -> SagaClient:
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(home)}))
    upgrade(client.store.engine)
    return client


def engine_of(client: SagaClient) -> SagaEngine:
    return SagaEngine(
        client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: ORDERS
    )


def started(client: SagaClient, *sagas: tuple[str, dict[str, Any]]) -> SagaEngine:
    engine = engine_of(client)
    for saga_id, context in sagas:
        engine.start(StartRequested(saga_id, "keyed_orders", context))
    return engine


def test_the_migration_adds_the_column_and_its_partial_index(client: SagaClient) -> None:
    inspector = inspect(client.store.engine)
    assert "business_key" in {c["name"] for c in inspector.get_columns("saga_checkpoints")}
    indexes = {i["name"]: i for i in inspector.get_indexes("saga_checkpoints")}
    assert indexes["ix_saga_checkpoints_business_key"]["column_names"] == ["business_key"]


def test_the_codec_round_trips_the_key_and_reads_older_rows_without_it() -> None:
    saga = engine_less_saga()
    row = saga_to_row(saga)
    assert row["business_key"] == "A-1"
    full = {**row, "version": 1}
    assert saga_from_row(full).business_key == "A-1"
    older = {k: v for k, v in full.items() if k != "business_key"}  # before 0006
    assert saga_from_row(older).business_key is None


def engine_less_saga() -> Any:
    from saga_worker.core.transition import start

    return start(ORDERS, StartRequested("s-1", "keyed_orders", {"order_id": "A-1"}), NOW).saga


def test_a_step_messages_carried_checkpoint_round_trips_the_key() -> None:
    saga = replace(engine_less_saga(), version=1)
    key = "k" * 64
    data = json.loads(json.dumps(snapshot.encode(key, Loaded(saga, "a" * 64), 1000.0)))
    assert data["business_key"] == "A-1"
    decoded = snapshot.decode(
        key,
        data,
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
        context=json.loads(json.dumps(dict(saga.context))),
        now=1001.0,
        max_age_seconds=30,
    )
    assert decoded is not None and decoded.saga.business_key == "A-1"
    data["business_key"] = "B-2"  # signed like every other field
    assert (
        snapshot.decode(
            key,
            data,
            saga_id=saga.saga_id,
            saga_type=saga.saga_type,
            context=dict(saga.context),
            now=1001.0,
            max_age_seconds=30,
        )
        is None
    )


def test_the_store_writes_the_key_at_start_and_never_updates_it(client: SagaClient) -> None:
    started(client, ("s-1", {"order_id": "A-1"}))

    def without_key(saga: Any) -> Any:
        stale = replace(saga, business_key=None)  # as decoded from an older build's message
        return transition(ORDERS, stale, StepSucceeded(0, Direction.FORWARD, 1, {}), NOW)

    assert client.store.apply("s-1", without_key, NOW) is not None
    with client.store.engine.connect() as conn:
        row = conn.execute(
            select(checkpoints.c.business_key, checkpoints.c.completed_steps).where(
                checkpoints.c.saga_id == "s-1"
            )
        ).one()
    assert tuple(row) == ("A-1", ["reserve"])


def test_list_sagas_finds_the_sagas_with_a_key_exactly(client: SagaClient) -> None:
    started(
        client,
        ("s-1", {"order_id": "A-1"}),
        ("s-2", {"order_id": "A-10"}),
        ("s-3", {"order_id": 7}),
        ("s-4", {}),
        ("s-5", {"order_id": "A-1"}),
    )
    page = client.list_sagas(business_key="A-1")
    assert sorted(s.saga_id for s in page.items) == ["s-1", "s-5"]
    assert page.total == 2 and page.counts["RUNNING"] == 2
    assert {s.business_key for s in page.items} == {"A-1"}
    assert [s.saga_id for s in client.list_sagas(business_key="7").items] == ["s-3"]
    assert client.list_sagas(business_key="a-1").items == []  # exact, case included
    assert client.list_sagas().total == 5


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 256])
def test_a_key_no_saga_can_have_is_a_filter_error(client: SagaClient, bad: str) -> None:
    with pytest.raises(InvalidFilter, match="business key"):
        client.list_sagas(business_key=bad)


def test_the_counts_per_state_are_of_that_key(client: SagaClient) -> None:
    started(client, ("s-1", {"order_id": "A-1"}), ("s-2", {}))
    counts = client.list_sagas(business_key="A-1", states=["COMPLETED"]).counts
    assert counts["RUNNING"] == 1


def test_the_cli_lists_by_key_and_status_shows_it(client: SagaClient, home: Path) -> None:
    started(client, ("s-1", {"order_id": "A-1"}), ("s-2", {"order_id": "B-2"}), ("s-3", {}))
    env = {"SAGA_HOME": str(home)}
    runner = CliRunner()
    listed = runner.invoke(main, ["list", "--key", "A-1", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    items = json.loads(listed.output)["items"]
    assert [(i["saga_id"], i["business_key"]) for i in items] == [("s-1", "A-1")]

    table = runner.invoke(main, ["list"], env=env)
    assert table.exit_code == 0, table.output
    header = table.output.splitlines()[0].split()
    assert header[:4] == ["SAGA", "ID", "TYPE", "KEY"]
    assert "B-2" in table.output

    unkeyed = runner.invoke(main, ["list", "--key", "nope"], env=env)
    assert unkeyed.exit_code == 0 and "no sagas match" in unkeyed.output

    shown = runner.invoke(main, ["status", "s-1"], env=env)
    assert shown.exit_code == 0, shown.output
    assert any(line.split() == ["key", "A-1"] for line in shown.output.splitlines())
    as_json = runner.invoke(main, ["status", "s-3", "--json"], env=env)
    assert json.loads(as_json.output)["business_key"] is None


def test_the_postgresql_update_statement_leaves_the_key_alone() -> None:
    """The one PostgreSQL statement is built from the table: its UPDATE must not name the
    write-once column, whose parameter an update does not pass ("query parameter missing")."""
    from saga_worker.store.write import _STATEMENTS

    assert '"business_key"' in _STATEMENTS["insert"]
    assert "business_key" not in _STATEMENTS["update"]
