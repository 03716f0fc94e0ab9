"""The signing key with PostgreSQL: required, checked against the database's fingerprint, and
moved out of the database where an earlier saga_worker kept it (issue 14, item 10)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import insert

from saga_worker.audit.redaction import Redactor
from saga_worker.config import Settings
from saga_worker.errors import ConfigurationError
from saga_worker.keys import fingerprint
from saga_worker.store.connect import create_db_engine
from saga_worker.store.keyring import (
    FINGERPRINT,
    STORED_KEY,
    SigningKeyMismatch,
    signing_key_for,
)
from saga_worker.store.repository import SagaStore
from saga_worker.store.tables import settings_table

from .conftest import REPO, fresh_postgres_database

pytestmark = pytest.mark.integration

KEY_A = "a" * 40
KEY_B = "b" * 40


def _settings(url: str, key: str | None, home: Path) -> Settings:
    return Settings(database_url=url, broker_url="memory://", home=home, signing_key=key)


@pytest.fixture()
def store(pg_admin_url: str) -> SagaStore:
    return SagaStore(create_db_engine(fresh_postgres_database(pg_admin_url)), Redactor(()))


def _url(store: SagaStore) -> str:
    return store.engine.url.render_as_string(hide_password=False)


def test_postgresql_needs_a_key(store: SagaStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is required with PostgreSQL") as caught:
        signing_key_for(_settings(_url(store), None, tmp_path), store)
    assert "token_hex(32)" in str(caught.value)
    assert store.setting(STORED_KEY) is None  # nothing generated behind the operator's back


def test_the_first_key_is_fingerprinted_and_another_one_refused(
    store: SagaStore, tmp_path: Path
) -> None:
    assert signing_key_for(_settings(_url(store), KEY_A, tmp_path), store) == KEY_A
    assert store.setting(FINGERPRINT) == fingerprint(KEY_A)
    assert KEY_A not in (store.setting(FINGERPRINT) or "")
    assert signing_key_for(_settings(_url(store), KEY_A, tmp_path), store) == KEY_A
    with pytest.raises(SigningKeyMismatch, match="same key"):
        signing_key_for(_settings(_url(store), KEY_B, tmp_path), store)


def test_a_worker_with_the_wrong_key_refuses_to_start(store: SagaStore, tmp_path: Path) -> None:
    signing_key_for(_settings(_url(store), KEY_A, tmp_path), store)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SAGA_DATABASE_URL": _url(store),
        "SAGA_SIGNING_KEY": KEY_B,
        "SAGA_HOME": str(tmp_path),
        "SAGA_QUEUE": "wrong-key",
        "SAGA_IMPORTS": "saga_worker.examples",
    }
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "saga_worker.app", "worker", "--pool", "solo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 6, done.stderr[-2000:]
    assert "does not match the key this database was set up with" in done.stderr


def test_move_key_takes_an_earlier_key_out_of_the_database(
    store: SagaStore, tmp_path: Path
) -> None:
    with store.engine.begin() as conn:  # what saga_worker 0.2 generated
        conn.execute(insert(settings_table).values(key=STORED_KEY, value=KEY_A))
    with pytest.raises(ConfigurationError, match="db move-key"):
        signing_key_for(_settings(_url(store), None, tmp_path), store)
    with pytest.raises(SigningKeyMismatch):
        signing_key_for(_settings(_url(store), KEY_B, tmp_path), store)
    target = tmp_path / "saga_signing_key"
    env = {**os.environ, "SAGA_DATABASE_URL": _url(store), "SAGA_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("saga-worker")), "db", "move-key", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert target.read_text() == KEY_A + "\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert store.setting(STORED_KEY) is None
    assert store.setting(FINGERPRINT) == fingerprint(KEY_A)
    again = subprocess.run(
        [str(Path(sys.executable).with_name("saga-worker")), "db", "move-key", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 6 and "exists already" in again.stderr, again.stderr
    file_settings = Settings.from_env(
        {"SAGA_DATABASE_URL": _url(store), "SAGA_SIGNING_KEY_FILE": str(target)}
    )
    assert signing_key_for(file_settings, store) == KEY_A
