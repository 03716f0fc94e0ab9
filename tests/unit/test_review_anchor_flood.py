"""Review of issue 14: `saga.anchor` is an ordinary task any broker writer can send.

Each message appends a row to `saga_audit_anchors` (append-only: no role can delete it) and
aggregates the whole audit table. The beat sends one per SAGA_ANCHOR_INTERVAL_SECONDS; a
burst of messages pushed onto the queue must not append one anchor each.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from saga_worker.config import Settings
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.tables import anchors_table
from saga_worker.worker.app import create_app


def test_a_burst_of_saga_anchor_messages_appends_at_most_one_anchor_per_interval(
    tmp_path: Path,
) -> None:
    settings = Settings.from_env({"SAGA_HOME": str(tmp_path)})
    assert settings.anchor_interval_seconds == 3600.0
    engine = create_db_engine(settings.database_url, pool=False)
    upgrade(engine)
    engine.dispose()
    app = create_app(settings)
    app.conf.task_always_eager = True
    task = app.tasks["saga.anchor"]
    for _ in range(20):  # what anyone who can write to the saga queue can send
        task.apply().get(disable_sync_subtasks=False)
    engine = app.saga_runtimes.get().store.engine
    with engine.connect() as conn:
        anchors = conn.execute(select(func.count()).select_from(anchors_table)).scalar_one()
    assert anchors <= 1, f"20 unauthenticated saga.anchor messages appended {anchors} anchors"
