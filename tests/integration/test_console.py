"""The saga console as people and scripts use it (issue 17): a real `saga-worker web` server
process, a real Celery worker, Redis and PostgreSQL; pages driven by a real headless
Chromium (Debian's, through Playwright); the API and its authentication rules over HTTP.

Screenshots go to the test's folder; with SAGA_UPDATE_SCREENSHOTS=1 the timeline's also
replaces docs/images/console-timeline.png (the README's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.waiting import wait_for

from .conftest import REPO, SIGNING_KEY, WorkerProcess, fresh_postgres_database
from .processes import Rig
from .test_metrics import free_port

pytestmark = pytest.mark.integration

OPERATOR = ("olivia", "operator-password-1")
VIEWER = ("victor", "viewer-password-12")
SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


@dataclass
class Console:
    url: str
    rig: Rig
    process: WorkerProcess
    folder: Path
    compensated: str
    order_ref: str
    failed: str
    completed: str

    def rows(self, saga_id: str) -> list[dict[str, Any]]:
        return self.rig.store.audit_trail(saga_id)


@pytest.fixture(scope="module")
def console(
    pg_admin_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    folder = tmp_path_factory.mktemp("console")
    rig = Rig.create(fresh_postgres_database(pg_admin_url), broker_url, folder / "rig")
    users = folder / "users.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SAGA_")},
        **rig.env,
        "SAGA_SIGNING_KEY": SIGNING_KEY,
        "SAGA_WEB_USERS_FILE": str(users),
        "SAGA_FLOWER_URL": "http://flower.example:5555",
        "PYTHONPATH": str(REPO),
    }
    for (name, password), role in ((OPERATOR, "operator"), (VIEWER, "viewer")):
        added = subprocess.run(
            [SAGA_WORKER, "web", "add-user", name, "--role", role, "--password-stdin"],
            input=password + "\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
    assert "operator-password" not in users.read_text()  # only hashes are kept
    port = free_port()
    log = folder / "web.log"
    process = subprocess.Popen(
        [SAGA_WORKER, "web", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = WorkerProcess(process, log)
    url = f"http://127.0.0.1:{port}"
    try:
        rig.start_worker()

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the console to answer /healthz", details=server.log_tail)
        order_ref = f"ORD-{uuid.uuid4().hex[:8]}"
        compensated = rig.start_saga(
            "order_workflow",
            {"amount": 5000, "limit": 1000, "order_ref": order_ref},
            f"order-{uuid.uuid4().hex[:8]}",
        )
        failed = rig.start_saga(
            "backtest_workflow",
            {"strategy_id": 3, "fail_step": "save_results", "fail_compensation": "run_strategy"},
            f"bt-failed-{uuid.uuid4().hex[:8]}",
        )
        completed = rig.start_saga(
            "backtest_workflow", {"strategy_id": 4}, f"bt-ok-{uuid.uuid4().hex[:8]}"
        )
        done = rig.wait_all([compensated, failed, completed], timeout=90)
        assert done[compensated].state.value == "COMPENSATED"
        assert done[failed].state.value == "FAILED"
        yield Console(url, rig, server, folder, compensated, order_ref, failed, completed)
    finally:
        server.stop()
        rig.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (scripts/test.sh installs it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def logged_in(browser: Browser, console: Console, who: tuple[str, str], path: str) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(console.url + path)
    assert "/login" in page.url  # pages need a login
    page.fill("input[name=name]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return page


# -- in a browser -------------------------------------------------------------------------------


def test_an_operator_finds_an_order_by_business_key_and_reads_its_compensated_timeline(
    browser: Browser, console: Console
) -> None:
    page = logged_in(browser, console, OPERATOR, f"/sagas?key={console.order_ref}")
    rows = page.locator("table.sagas tbody tr")
    assert rows.count() == 1
    assert console.compensated in rows.first.inner_text()
    rows.first.locator("a").click()
    page.wait_for_url(f"**/sagas/{console.compensated}")
    assert page.locator(".summary[data-state]").get_attribute("data-state") == "COMPENSATED"
    assert "verified" in page.locator(".badge").inner_text()
    bars = page.locator("svg.timeline rect.bar")
    steps = {bars.nth(i).get_attribute("data-step") for i in range(bars.count())}
    assert {"validate_order", "reserve_funds", "check_limits"} <= steps
    failed = page.locator('rect.bar[data-step="check_limits"][data-outcome="failed"]')
    assert failed.count() == 1
    assert page.locator("rect.bar.comp").count() == 2  # reserve_funds', validate_order's
    link = page.locator("svg.timeline a").first.get_attribute("href") or ""
    assert link.startswith("http://flower.example:5555/task/")
    events = page.locator("table.events").inner_text()
    for event in ("saga_start", "step_failed", "compensation_complete", "saga_compensated"):
        assert event in events
    assert "limits_checked" not in page.locator("table.changes").inner_text()
    assert "check_limits" in page.locator("details.err").first.inner_text()
    shot = console.folder / "console-timeline.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("SAGA_UPDATE_SCREENSHOTS") == "1":
        page.screenshot(path=str(REPO / "docs" / "images" / "console-timeline.png"))
    page.close()


def test_an_operator_retries_a_failed_saga_and_is_named_in_the_audit(
    browser: Browser, console: Console
) -> None:
    page = logged_in(browser, console, OPERATOR, f"/sagas/{console.failed}")
    page.fill(".actions form:has(button[value=retry]) input[name=reason]", "fixed the disk")
    page.click("button[value=retry]")
    page.wait_for_load_state()
    assert "retry: FAILED -> COMPENSATING" in page.locator(".flash").inner_text()
    page.screenshot(path=str(console.folder / "console-retry.png"), full_page=True)
    retried = [
        r
        for r in console.rows(console.failed)
        if r["event_type"] == "compensation_start" and (r["event_data"] or {}).get("operator_retry")
    ]
    assert retried and retried[0]["user_id"] == OPERATOR[0]
    assert "fixed the disk" in retried[0]["event_data"]["reason"]
    page.close()


def test_a_viewer_reads_but_every_action_is_refused(browser: Browser, console: Console) -> None:
    page = logged_in(browser, console, VIEWER, f"/sagas/{console.failed}")
    assert page.locator(".summary[data-state]").count() == 1
    assert page.locator("button[value=retry]").count() == 0  # no buttons for a viewer
    # A hand-made request with the page's own CSRF token is refused all the same.
    status = page.evaluate(
        """async (path) => {
            const csrf = document.querySelector("input[name=csrf]").value;
            const body = new URLSearchParams({csrf, reason: "viewer tries"});
            const r = await fetch(path, {method: "POST", body});
            return r.status;
        }""",
        f"/sagas/{console.failed}/retry",
    )
    assert status == 403
    page.screenshot(path=str(console.folder / "console-viewer.png"), full_page=True)
    page.close()


# -- over plain HTTP ------------------------------------------------------------------------------


def test_the_api_needs_a_user_and_refuses_viewers_writes(console: Console) -> None:
    url = console.url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    anonymous = httpx.get(f"{url}/api/sagas/{console.completed}")
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    wrong = httpx.get(f"{url}/api/sagas/{console.completed}", auth=(VIEWER[0], "nope-nope-nope"))
    assert wrong.status_code == 401
    read = httpx.get(f"{url}/api/sagas/{console.completed}", auth=VIEWER)
    assert read.status_code == 200
    body = read.json()
    assert body["saga"]["saga_id"] == console.completed and body["saga"]["state"] == "COMPLETED"
    assert body["events"][0]["event_type"] == "saga_start"
    for action in ("retry", "abort"):
        refused = httpx.post(f"{url}/api/sagas/{console.failed}/{action}", auth=VIEWER, json={})
        assert refused.status_code == 403, refused.text
    ended = httpx.post(f"{url}/api/sagas/{console.completed}/abort", auth=OPERATOR, json={})
    assert ended.status_code == 409 and "COMPLETED" in ended.json()["error"]
    missing = httpx.get(f"{url}/api/sagas/no-such-saga", auth=VIEWER)
    assert missing.status_code == 404
    found = httpx.get(f"{url}/api/sagas", params={"key": console.order_ref}, auth=VIEWER)
    assert [s["saga_id"] for s in found.json()["items"]] == [console.compensated]


def test_pages_redirect_to_the_login_and_forms_need_their_csrf_token(console: Console) -> None:
    url = console.url
    page = httpx.get(f"{url}/sagas/{console.completed}")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    with httpx.Client(base_url=url) as session:
        login = session.get("/login")
        token = login.text.split('name="csrf" value="')[1].split('"')[0]
        bad = session.post("/login", data={"csrf": token, "name": OPERATOR[0], "password": "x"})
        assert bad.status_code == 401
        forged = session.post(
            "/login", data={"csrf": "forged", "name": OPERATOR[0], "password": OPERATOR[1]}
        )
        assert forged.status_code == 401  # the form expired: no session
        ok = session.post(
            "/login", data={"csrf": token, "name": OPERATOR[0], "password": OPERATOR[1]}
        )
        assert ok.status_code == 303
        # Logged in, yet a form without the session's token, and an API write without the
        # header, are refused.
        no_token = session.post(f"/sagas/{console.failed}/abort", data={"reason": "x"})
        assert no_token.status_code == 403
        no_header = session.post(f"/api/sagas/{console.failed}/retry", json={})
        assert no_header.status_code == 403
        assert session.get(f"/api/sagas/{console.completed}").status_code == 200
