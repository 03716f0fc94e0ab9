"""Review of issue 14: a worker whose key does not match must not consume messages.

`check_signing_key` (worker_init) lets a worker start when the database cannot be reached
then ("the first task checks it again"). When the database comes back and the worker's key
is not the fingerprinted one, the first task's `runtimes.get()` raises SigningKeyMismatch:
the task fails, and with acks_late and task_acks_on_failure_or_timeout (Celery's default,
not changed by the app) the message is acknowledged and gone. Every start, abort, result
and step message that worker takes is lost, instead of the worker exiting (exit 6) or
leaving the messages to the workers that hold the right key.
"""

from __future__ import annotations

from pathlib import Path

from saga_worker.config import Settings
from saga_worker.keys import fingerprint
from saga_worker.store.connect import create_db_engine
from saga_worker.store.keyring import FINGERPRINT
from saga_worker.store.migrate import upgrade
from saga_worker.worker.app import create_app

RIGHT_KEY = "r" * 64
WRONG_KEY = "w" * 64


def test_a_task_on_a_worker_with_the_wrong_key_is_not_consumed_as_a_failure(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'saga.db'}"
    engine = create_db_engine(url, pool=False)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO saga_settings (key, value) VALUES (?, ?)",
            (FINGERPRINT, fingerprint(RIGHT_KEY)),
        )
    engine.dispose()
    settings = Settings.from_env(
        {
            "SAGA_HOME": str(tmp_path),
            "SAGA_DATABASE_URL": url,
            "SAGA_SIGNING_KEY": WRONG_KEY,
            "SAGA_IMPORTS": "saga_worker.examples",
        }
    )
    app = create_app(settings)
    # worker_init's check ran while the database was down (it only logs a warning then).
    assert app.conf.task_acks_late and app.conf.task_acks_on_failure_or_timeout
    result = app.tasks["saga.start"].apply(
        kwargs={"saga_type": "backtest_workflow", "context": {"strategy_id": 1}},
        task_id="review-wrong-key-1",
    )
    # A FAILURE of an acks_late task is acknowledged: the producer's start is lost for good.
    assert result.state != "FAILURE", f"the start message was consumed: {result.result!r}"
