"""The console's migrate action: the CLI's `saga-worker migrate`, as the logged-in operator."""

from __future__ import annotations

from starlette.testclient import TestClient

from .test_console_review import OPERATOR, VIEWER, World, basic, http, login, token, world

__all__ = ["http", "world"]  # fixtures


def test_migrate_reaches_the_migrator_and_its_refusal_is_told(
    world: World, http: TestClient
) -> None:
    saga_id = world.start({"amount": 5})
    url = f"/api/sagas/{saga_id}/migrate"
    assert http.post(url, json={"to_version": "v9"}, headers=basic(VIEWER)).status_code == 403
    missing = http.post(url, json={}, headers=basic(OPERATOR))
    assert missing.status_code == 400 and "to_version" in missing.json()["error"]
    # No such version here: the migrator says so (as `saga-worker migrate` does).
    refused = http.post(url, json={"to_version": "v9", "map": ["a=b"]}, headers=basic(OPERATOR))
    assert refused.status_code == 400, refused.text
    assert "'v9' is not registered" in refused.json()["error"]


def test_the_saga_page_offers_migrate_to_operators(world: World, http: TestClient) -> None:
    saga_id = world.start({"amount": 5})
    login(http)
    page = http.get(f"/sagas/{saga_id}")
    assert 'value="migrate"' in page.text
    answer = http.post(
        f"/sagas/{saga_id}/migrate",
        data={"csrf": token(page.text), "to_version": "v9", "map": "a=b, c=d", "reason": "r"},
        follow_redirects=True,
    )
    assert answer.status_code == 200 and "v9" in answer.text  # the refusal, flashed
