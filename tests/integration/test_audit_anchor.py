"""Issue 14, item 9: an anchor (every saga's row count and head, as a Merkle root) kept
outside the database shows a saga deleted whole or its newest rows cut, which no chain can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from saga_worker.audit.anchor import Head, merkle_root
from saga_worker.store.connect import create_db_engine

from .conftest import migrated_database
from .test_audit_trail import Driver
from .test_operations import cli

pytestmark = pytest.mark.integration


def test_merkle_root_depends_on_every_head_and_not_on_order() -> None:
    heads = [Head(f"s-{n}", n + 1, f"{n:064x}") for n in range(5)]
    root = merkle_root(heads)
    assert merkle_root(reversed(heads)) == root
    assert merkle_root(heads[:4]) != root
    assert merkle_root([*heads[:4], Head("s-4", 6, heads[4].head)]) != root
    assert len({merkle_root(heads[:n]) for n in range(6)}) == 6


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_verify_against_an_anchor_reports_sagas_and_rows_missing_since(
    backend: str, pg_admin_url: str, tmp_path: Path
) -> None:
    url = migrated_database(backend, pg_admin_url, tmp_path)
    driver = Driver(url)
    try:
        for saga_id in ("a-whole", "a-cut", "a-kept"):
            driver.completed(saga_id)
    finally:
        driver.close()
    env = {"SAGA_DATABASE_URL": url, "SAGA_HOME": str(tmp_path)}
    anchor_file = tmp_path / "anchor.json"
    made = cli(["audit", "anchor", "-o", str(anchor_file)], env)
    assert made.returncode == 0, made.stderr
    anchor = json.loads(anchor_file.read_text())
    assert anchor["format"] == "saga_worker anchor v1" and anchor["sagas"] == 3
    assert anchor["rows"] == sum(n for _, n, _ in anchor["heads"]) == 24
    assert "3 sagas, 24 rows" in made.stderr

    # New sagas and rows since the anchor are fine.
    driver = Driver(url)
    try:
        driver.completed("a-later")
    finally:
        driver.close()
    ok = cli(["audit", "verify", "--anchor", str(anchor_file)], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    again = cli(["audit", "anchor"], env)  # chained onto the first
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["prev_hash"] == anchor["hash"]

    # What only a superuser (PostgreSQL, triggers off) or the file's owner (SQLite) can do.
    engine = create_db_engine(url, pool=False)
    with engine.begin() as conn:
        if backend == "postgres":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            conn.execute(text("DROP TRIGGER saga_audit_logs_no_delete"))
        conn.execute(text("DELETE FROM saga_audit_logs WHERE saga_id = 'a-whole'"))
        conn.execute(
            text(
                "DELETE FROM saga_audit_logs WHERE id = "
                "(SELECT max(id) FROM saga_audit_logs WHERE saga_id = 'a-cut')"
            )
        )
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("UPDATE saga_audit_anchors SET rows = 0"))
    engine.dispose()
    found = cli(["audit", "verify", "--anchor", str(anchor_file), "--json"], env)
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert {(p["kind"], p["saga_id"]) for p in report["problems"]} == {
        ("saga_missing", "a-whole"),
        ("rows_missing", "a-cut"),
    }

    edited = dict(anchor, heads=anchor["heads"][1:])
    anchor_file.write_text(json.dumps(edited))
    tampered = cli(["audit", "verify", "--anchor", str(anchor_file), "--json"], env)
    assert tampered.returncode == 1
    assert "anchor_file" in {p["kind"] for p in json.loads(tampered.stdout)["problems"]}
