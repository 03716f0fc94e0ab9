"""Review of issue 13: the insert-new guard of store/write.py under concurrent writers (fixed
in issue 14 by the database's chain trigger).

The `prior` CTE compares the saga_id's last audit row (by id DESC) with the head the rows
were chained from, and rejection rows check NOT EXISTS on the checkpoint. Both read the
statement's snapshot: a concurrent writer whose statement has not committed yet is
invisible, nothing blocks, and both commit. A trigger that sleeps inside the first
writer's INSERT holds its statement open long enough for the second to run through the
real store methods, which is what two workers (or a redelivered refused start next to a
good one) do on a busy database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from saga_worker.audit.redaction import Redactor
from saga_worker.audit.verify import verify_chain
from saga_worker.core.rejection import rejected_start
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore

from .conftest import fresh_postgres_database
from .test_write_path import _started

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _reject(reason: str) -> Callable[[SagaStore], Any]:
    return lambda store: store.record_rejection("w-1", (rejected_start(reason),), {}, NOW)


def _start(store: SagaStore) -> Any:
    return store.create(_started("w-1"), NOW)


@pytest.mark.parametrize(
    ("slow_when", "first", "second"),
    [
        ("NEW.error_message = 'slow'", _reject("slow"), _start),
        ("NEW.error_message = 'slow'", _reject("slow"), _reject("fast")),
        ("NEW.event_type = 'saga_start'", _start, _reject("fast")),
    ],
    ids=["rejection-then-start", "rejection-then-rejection", "start-then-rejection"],
)
def test_concurrent_writes_under_a_new_saga_id_keep_one_chain(
    pg_admin_url: str,
    slow_when: str,
    first: Callable[[SagaStore], Any],
    second: Callable[[SagaStore], Any],
) -> None:
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION review_slow() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER review_slow BEFORE INSERT ON saga_audit_logs FOR EACH ROW "
                f"WHEN ({slow_when}) EXECUTE FUNCTION review_slow()"
            )
        )
    store = SagaStore(engine, Redactor(()))
    results: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: results.setdefault("first", first(store)))
    slow.start()
    time.sleep(0.5)  # the first statement is inside its INSERT, not committed
    results["second"] = second(store)
    slow.join()
    trail = store.audit_trail("w-1")
    engine.dispose()
    # The writes serialize: the chain trigger refuses the slow writer's rows (built on the
    # genesis hash), which then rebuilds on the new head, or, a rejection under a saga that
    # now exists, writes nothing.
    shown = [(r["id"], r["event_type"], r["prev_hash"][:8]) for r in trail]
    assert verify_chain(trail) == [], shown
