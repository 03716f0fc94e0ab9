"""The console's search counts each state only up to a limit (`list_sagas(count_limit=...)`):
a bounded scan per state instead of counting every match on each page; the page then says
"10,000+ sagas" (SQLite here; PostgreSQL at 1M sagas in docs/benchmark.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from starlette.testclient import TestClient

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested
from saga_worker.engine import SagaEngine
from saga_worker.errors import InvalidFilter
from saga_worker.store.migrate import upgrade
from saga_worker.store.tables import checkpoints
from saga_worker.testing import RecordingDispatcher
from saga_worker.web import app as web_app
from saga_worker.web.settings import WebSettings
from saga_worker.web.users import UsersFile


def noop(call: StepInput) -> dict[str, Any]:
    return {}


DEFINITIONS = {name: SagaDefinition(name, [Step("only", noop)]) for name in ("a", "b")}


@pytest.fixture
def client(tmp_path: Path) -> SagaClient:
    """5 sagas of type a (2 of them COMPLETED) and 1 of type b, all RUNNING otherwise."""
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    engine = SagaEngine(
        client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: DEFINITIONS[t]
    )
    for i in range(5):
        engine.start(StartRequested(f"a-{i}", "a", {}))
    engine.start(StartRequested("b-0", "b", {}))
    with client.store.engine.begin() as conn:
        conn.execute(
            update(checkpoints)
            .where(checkpoints.c.saga_id.in_(["a-0", "a-1"]))
            .values(state="COMPLETED")
        )
    return client


def test_without_a_limit_the_counts_are_exact(client: SagaClient) -> None:
    page = client.list_sagas()
    assert (page.total, page.total_at_least) == (6, False)
    assert page.counts["RUNNING"] == 4 and page.counts["COMPLETED"] == 2


def test_each_state_is_counted_up_to_the_limit(client: SagaClient) -> None:
    page = client.list_sagas(count_limit=3, page_size=2)
    assert page.counts["RUNNING"] == 3 and page.counts["COMPLETED"] == 2
    assert (page.total, page.total_at_least, page.pages) == (5, True, 3)
    assert page.as_dict()["total_at_least"] is True
    assert len(page.items) == 2  # the page itself is not limited by the count


def test_a_limit_not_reached_gives_exact_counts(client: SagaClient) -> None:
    page = client.list_sagas(count_limit=4)
    assert (page.total, page.total_at_least) == (6, False)


def test_the_limit_applies_under_every_filter(client: SagaClient) -> None:
    page = client.list_sagas(saga_type="a", count_limit=2)
    assert page.counts == {"RUNNING": 2, "COMPLETED": 2} | {
        s: 0 for s in ("COMPENSATING", "COMPENSATED", "ABORTED", "FAILED")
    }
    assert page.total_at_least
    # A state over the limit that the state filter leaves out does not make `total` a bound.
    done = client.list_sagas(saga_type="a", states=["COMPLETED"], count_limit=2)
    assert (done.total, done.total_at_least) == (2, False)
    assert [s.saga_id for s in client.list_sagas(saga_type="b", count_limit=1).items] == ["b-0"]


def test_a_limit_below_one_is_refused(client: SagaClient) -> None:
    with pytest.raises(InvalidFilter):
        client.list_sagas(count_limit=0)


def test_the_search_page_says_more_than_the_limit(
    client: SagaClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_app, "COUNT_LIMIT", 3)
    users = tmp_path / "users.json"
    UsersFile(users).add("viewer", "viewer", "a long enough password")
    with TestClient(web_app.create_app(client, WebSettings(users_file=users))) as http:
        login = http.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert token is not None
        http.post(
            "/login",
            data={"csrf": token.group(1), "name": "viewer", "password": "a long enough password"},
        )
        page = http.get("/sagas", params={"page_size": "2"})
        assert "5+ sagas · page 1 of 3+" in page.text
        api = http.get("/api/sagas").json()
        assert api["total"] == 5 and api["total_at_least"] is True
        exact = http.get("/sagas", params={"type": "b"})
        assert "1 sagas · page 1 of 1<" in exact.text
