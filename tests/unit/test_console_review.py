"""Adversarial review of the saga console (issue 17, branch i17-web).

The tests under "findings" reproduce the review's findings (each failed before its fix).
The tests under "sound" pin down what the review
checked and found right (escaping, redirects after the login, roles read at each request,
cookie flags, CSRF on forms and session-authenticated API writes).

Everything runs the Starlette app in-process (TestClient) over SQLite in a temp folder;
sagas are driven through a real `SagaEngine` with a `RecordingDispatcher` (no broker).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from saga_worker import registry
from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested, StepFailed, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.testing import RecordingDispatcher
from saga_worker.web import users as users_module
from saga_worker.web.app import create_app
from saga_worker.web.settings import WebSettings
from saga_worker.web.users import UsersFile

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OPERATOR = ("olivia", "operator-password-1")
VIEWER = ("victor", "viewer-password-12")
FLOWER = "http://flower.example:5555"
SECRET = "sk_live_SECRET123"
CARD = "4111 1111 1111 1111"


def noop(call: StepInput) -> dict[str, Any]:
    return {}


DEFINITION = SagaDefinition(
    "review17_order",
    [Step("reserve", noop, compensate=noop), Step("charge", noop, compensate=noop)],
)


@dataclass
class World:
    client: SagaClient
    dispatcher: RecordingDispatcher
    users: UsersFile
    app: Starlette

    def start(self, context: dict[str, Any] | None = None) -> str:
        saga_id = f"o-{uuid.uuid4().hex[:10]}"
        request = StartRequested(saga_id, DEFINITION.saga_type, context or {}, user_id="alice")
        self.client.engine.start(request)
        return saga_id

    def failed(self, message: str = "charge failed") -> str:
        """A saga FAILED for good: its second step failed, then the first's compensation."""
        saga_id = self.start({"amount": 5})
        engine = self.client.engine
        engine.handle(saga_id, StepSucceeded(0, Direction.FORWARD, 1, {"reserved": True}))
        engine.handle(
            saga_id, StepFailed(1, Direction.FORWARD, 1, "ValueError", message, retryable=False)
        )
        engine.handle(
            saga_id,
            StepFailed(0, Direction.COMPENSATE, 1, "ValueError", "refund failed", retryable=False),
        )
        assert self.client.status(saga_id).saga.state.value == "FAILED"
        return saga_id


@pytest.fixture
def world(tmp_path: Path) -> World:
    registry.register(DEFINITION)
    settings = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_DATABASE_URL": f"sqlite:///{tmp_path}/s.db"}
    )
    dispatcher = RecordingDispatcher()
    client = SagaClient(settings, dispatcher=dispatcher)
    upgrade(client.store.engine)
    users = UsersFile(tmp_path / "users.json")
    users.add(OPERATOR[0], "operator", OPERATOR[1])
    users.add(VIEWER[0], "viewer", VIEWER[1])
    web = WebSettings(users_file=tmp_path / "users.json", flower_url=FLOWER)
    return World(client, dispatcher, users, create_app(client, web))


@pytest.fixture
def http(world: World) -> Iterator[TestClient]:
    with TestClient(world.app, raise_server_exceptions=False) as client:
        yield client


def token(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def login(http: TestClient, who: tuple[str, str] = OPERATOR) -> None:
    form = {"csrf": token(http.get("/login").text), "name": who[0], "password": who[1]}
    answer = http.post("/login", data=form, follow_redirects=False)
    assert answer.status_code == 303, answer.text


def basic(who: tuple[str, str]) -> dict[str, str]:
    value = base64.b64encode(f"{who[0]}:{who[1]}".encode()).decode()
    return {"authorization": f"Basic {value}"}


# -- findings ---------------------------------------------------------------------------------


def test_overview_and_its_api_redact_saga_errors(world: World, http: TestClient) -> None:
    world.failed(f"charge failed: api_key={SECRET} card {CARD}")
    login(http, VIEWER)
    page = http.get("/").text
    api = http.get("/api/overview").text
    assert "charge failed" in page and "charge failed" in api
    for shown in (page, api):
        assert SECRET not in shown and CARD not in shown


def test_api_writes_need_a_json_content_type(world: World, http: TestClient) -> None:
    saga_id = world.start({"amount": 5})
    forged = http.post(
        f"/api/sagas/{saga_id}/abort",
        content=b'{"reason":"csrf","x":"="}',  # what <form enctype="text/plain"> can send
        headers={**basic(OPERATOR), "content-type": "text/plain"},
    )
    assert forged.status_code == 415, forged.text
    assert not world.client.status(saga_id).saga.abort_requested


def test_password_checks_run_off_the_event_loop(
    world: World, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    where: list[str] = []
    check = UsersFile.check

    def spy(self: UsersFile, name: str, password: str) -> Any:
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return check(self, name, password)

    monkeypatch.setattr(UsersFile, "check", spy)
    http.get("/api/overview", headers=basic(VIEWER))
    login(http, VIEWER)
    assert where == ["worker thread", "worker thread"]


def test_repeated_wrong_passwords_are_throttled(world: World, http: TestClient) -> None:
    statuses = [
        http.get("/api/overview", headers=basic((OPERATOR[0], f"guess-{n:04}-xyz"))).status_code
        for n in range(12)
    ]
    assert 429 in statuses, statuses


def test_a_password_change_ends_existing_sessions(world: World, http: TestClient) -> None:
    login(http)
    assert http.get("/", follow_redirects=False).status_code == 200
    world.users.add(OPERATOR[0], "operator", "a-brand-new-password")
    assert http.get("/", follow_redirects=False).status_code == 303


def test_a_logged_out_cookie_cannot_be_replayed(world: World, http: TestClient) -> None:
    login(http)
    copied = dict(http.cookies)
    logout = http.post("/logout", data={"csrf": token(http.get("/").text)}, follow_redirects=False)
    assert logout.status_code == 303 and http.get("/", follow_redirects=False).status_code == 303
    with TestClient(world.app, cookies=copied) as replay:
        assert replay.get("/", follow_redirects=False).status_code == 303


def test_api_force_must_be_a_boolean(world: World, http: TestClient) -> None:
    saga_id = world.start({"amount": 5})
    sent = len(world.dispatcher.sent)
    plain = http.post(f"/api/sagas/{saga_id}/retry", json={"force": False}, headers=basic(OPERATOR))
    assert plain.status_code == 409 and len(world.dispatcher.sent) == sent
    stringly = http.post(
        f"/api/sagas/{saga_id}/retry", json={"force": "false"}, headers=basic(OPERATOR)
    )
    assert stringly.status_code in (400, 409), stringly.text  # refused, or taken as false
    assert len(world.dispatcher.sent) == sent


def test_a_failed_send_is_reported(world: World, http: TestClient) -> None:
    saga_id = world.failed()
    world.dispatcher.fail_next(5)
    answer = http.post(f"/api/sagas/{saga_id}/retry", json={}, headers=basic(OPERATOR))
    assert world.dispatcher.failed, "the retry's send should have failed"
    assert answer.json().get("send_errors"), answer.text


def test_each_attempt_records_its_task_id_and_links_to_flower(
    world: World, http: TestClient
) -> None:
    saga_id = world.start({"amount": 5})
    starts = [r for r in world.client.audit_trail(saga_id) if r["event_type"] == "step_start"]
    assert starts and isinstance((starts[0]["event_data"] or {}).get("task_id"), str)
    login(http, VIEWER)
    assert f'href="{FLOWER}/task/' in http.get(f"/sagas/{saga_id}").text


def test_a_refused_logout_says_so(world: World, http: TestClient) -> None:
    login(http)
    answer = http.post("/logout", data={"csrf": "stale"}, follow_redirects=False)
    still_in = http.get("/", follow_redirects=False).status_code == 200
    assert answer.status_code == 403 or not still_in


def test_a_database_outage_is_a_503(world: World, http: TestClient, tmp_path: Path) -> None:
    saga_id = world.start()
    # A database that cannot be opened (a folder): an outage, as healthz says.
    world.client.store.engine = create_db_engine(f"sqlite:///{tmp_path}")
    assert http.get("/healthz").status_code == 503
    answer = http.get(f"/api/sagas/{saga_id}", headers=basic(VIEWER))
    assert answer.status_code == 503, answer.text


def test_a_huge_page_number_is_a_400(world: World, http: TestClient) -> None:
    answer = http.get("/api/sagas", params={"page": str(10**23)}, headers=basic(VIEWER))
    assert answer.status_code == 400, answer.text


def test_pages_forbid_framing_and_caching(world: World, http: TestClient) -> None:
    login(http)
    answer = http.get("/")
    csp = answer.headers.get("content-security-policy", "")
    assert answer.headers.get("x-frame-options") == "DENY" or "frame-ancestors" in csp
    assert "no-store" in answer.headers.get("cache-control", "")
    assert answer.headers.get("x-content-type-options") == "nosniff"


def test_an_oversized_login_body_is_refused(world: World, http: TestClient) -> None:
    form = {"csrf": token(http.get("/login").text), "name": "x" * 600_000, "password": "y"}
    assert http.post("/login", data=form).status_code == 413


def test_the_live_fragment_answers_401_without_a_session(world: World, http: TestClient) -> None:
    saga_id = world.start()
    assert http.get(f"/sagas/{saga_id}/live", follow_redirects=False).status_code == 401


def test_concurrent_first_actions_build_one_dispatcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import saga_worker.worker.app as worker_app
    import saga_worker.worker.dispatch as dispatch

    built: list[object] = []

    def slow_app(settings: Settings) -> object:
        time.sleep(0.2)
        built.append(settings)
        return object()

    class Dispatcher:
        def __init__(self, *args: object) -> None:
            pass

    monkeypatch.setattr(worker_app, "create_app", slow_app)
    monkeypatch.setattr(dispatch, "CeleryDispatcher", Dispatcher)
    settings = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_DATABASE_URL": f"sqlite:///{tmp_path}/s.db"}
    )
    client = SagaClient(settings)
    upgrade(client.store.engine)
    barrier = threading.Barrier(4)
    engines: list[object] = []

    def first_action() -> None:
        barrier.wait()
        engines.append(client.engine)

    threads = [threading.Thread(target=first_action) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert all(engine is engines[0] for engine in engines)


def test_head_on_the_api_with_a_session(world: World, http: TestClient) -> None:
    saga_id = world.start()
    login(http, VIEWER)
    assert http.head(f"/api/sagas/{saga_id}").status_code == 200


def test_search_by_saga_id(world: World, http: TestClient) -> None:
    wanted, _other = world.start(), world.start()
    found = http.get("/api/sagas", params={"saga_id": wanted}, headers=basic(VIEWER)).json()
    assert [s["saga_id"] for s in found["items"]] == [wanted]


# -- sound ------------------------------------------------------------------------------------


def test_text_from_sagas_is_escaped_on_every_page(world: World, http: TestClient) -> None:
    script = "<script>alert(1)</script>"
    saga_id = world.start({"note": script, "password": "hunter2"})
    world.client.engine.handle(
        saga_id,
        StepFailed(
            0,
            Direction.FORWARD,
            1,
            "ValueError",
            f"<img src=x onerror=alert(1)> {script}",
            stack_trace=f"Traceback {script}",
            retryable=False,
        ),
    )
    login(http, VIEWER)
    for path in (f"/sagas/{saga_id}", f"/sagas/{saga_id}/live", "/sagas", "/"):
        page = http.get(path).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "hunter2" not in page, path
    searched = http.get("/sagas", params={"type": script, "user": '"><svg onload=x>'}).text
    assert "<script>alert" not in searched and "<svg onload" not in searched


@pytest.mark.parametrize(
    "target",
    ["//evil.example", "/\\evil.example", "/\t/evil.example", "https://evil.example", " //x"],
)
def test_the_login_redirects_only_to_this_site(world: World, http: TestClient, target: str) -> None:
    form = {"csrf": token(http.get("/login").text), "name": OPERATOR[0], "password": OPERATOR[1]}
    answer = http.post("/login", params={"next": target}, data=form, follow_redirects=False)
    location = answer.headers["location"]
    assert answer.status_code == 303
    assert location.startswith("/") and not location.startswith("//")
    assert "\\" not in location and "\t" not in location


def test_roles_and_removals_take_effect_at_the_next_request(world: World, http: TestClient) -> None:
    saga_id = world.start()
    login(http)
    assert 'value="abort"' in http.get(f"/sagas/{saga_id}").text
    entries = json.loads(world.users.path.read_text())
    entries["users"][OPERATOR[0]]["role"] = "viewer"  # the role only, the password unchanged
    world.users.path.write_text(json.dumps(entries))
    assert 'value="abort"' not in http.get(f"/sagas/{saga_id}").text
    refused = http.post(
        f"/sagas/{saga_id}/abort",
        data={"csrf": token(http.get("/").text), "reason": "x"},
        follow_redirects=False,
    )
    assert refused.status_code == 403
    world.users.path.write_text('{"users": {}}')
    assert http.get("/", follow_redirects=False).status_code == 303


def test_viewers_are_refused_and_session_writes_need_the_csrf_header(
    world: World, http: TestClient
) -> None:
    saga_id = world.failed()
    for action in ("retry", "abort", "approve", "reject"):
        answer = http.post(f"/api/sagas/{saga_id}/{action}", json={}, headers=basic(VIEWER))
        assert answer.status_code == 403, (action, answer.text)
    login(http, VIEWER)
    page_token = token(http.get(f"/sagas/{saga_id}").text)
    refused = http.post(
        f"/sagas/{saga_id}/retry", data={"csrf": page_token, "reason": "x"}, follow_redirects=False
    )
    assert refused.status_code == 403
    assert http.post(f"/api/sagas/{saga_id}/retry", json={}).status_code == 403  # no header
    login(http)
    no_header = http.post(f"/api/sagas/{saga_id}/retry", json={})
    assert no_header.status_code == 403
    assert world.client.status(saga_id).saga.state.value == "FAILED"


def test_the_session_cookie_is_hardened_and_renewed_at_login(world: World) -> None:
    with TestClient(world.app) as plain:
        cookie = plain.get("/login").headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        assert "max-age=28800" in cookie
        before = token(plain.get("/login").text)
        login(plain)
        assert token(plain.get("/").text) != before  # a new session (and token) at login
    secure = create_app(world.client, WebSettings(users_file=world.users.path, secure_cookies=True))
    with TestClient(secure, base_url="https://console.example") as https:
        cookie = https.get("/login").headers["set-cookie"].lower()
        assert "httponly" in cookie and "; secure" in cookie


def test_unknown_names_and_wrong_passwords_look_the_same(world: World, http: TestClient) -> None:
    answers = []
    for name in (OPERATOR[0], "nobody-at-all", "not a valid name!"):
        form = {"csrf": token(http.get("/login").text), "name": name, "password": "wrong-pass-1"}
        answer = http.post("/login", data=form)
        answers.append((answer.status_code, answer.text.replace(token(answer.text), "")))
    assert len(set(answers)) == 1
    for header in ("Basic", "Basic !!!", "Basic " + base64.b64encode(b"\xff:\xfe").decode()):
        assert http.get("/api/overview", headers={"authorization": header}).status_code == 401


def test_healthz_needs_no_login_and_tells_nothing_else(world: World, http: TestClient) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/static/../app.py").status_code == 404
    assert users_module.MIN_PASSWORD >= 12
