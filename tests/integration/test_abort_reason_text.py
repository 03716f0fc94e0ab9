"""Review of issue 13: a NUL byte in saga.abort's reason through the one write path.

parse_abort checks the reason's type, length and UTF-8, not NUL. The reason goes into the
checkpoint's `error` (a text column) in the versioned UPDATE of store/write.py; psycopg
refuses NUL in text with a DataError, a DBAPIError, which saga.abort's DB_OUTAGE_RETRY
(`autoretry_for=(OperationalError, DBAPIError)`, `max_retries=None`) re-publishes forever:
anyone who can write to the broker parks a message that never succeeds.
"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError

from saga_worker.audit.redaction import Redactor
from saga_worker.core.decision import Limits
from saga_worker.core.events import StartRequested
from saga_worker.engine import SagaEngine
from saga_worker.errors import InvalidRequest
from saga_worker.requests import parse_abort
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.testing import RecordingDispatcher
from saga_worker.worker.tasks import DB_OUTAGE_RETRY

from .conftest import fresh_postgres_database
from .test_write_path import DEFINITION

pytestmark = pytest.mark.integration


def test_an_abort_reason_with_a_nul_byte_is_refused_or_stored(pg_admin_url: str) -> None:
    engine = create_db_engine(fresh_postgres_database(pg_admin_url))
    store = SagaStore(engine, Redactor(()))
    saga_engine = SagaEngine(
        store, RecordingDispatcher(), Limits(), definitions=lambda _type, _version: DEFINITION
    )
    saga_engine.start(StartRequested("nul-1", DEFINITION.saga_type, {}))
    kwargs = {"saga_id": "nul-1", "reason": "client\x00cancel"}
    try:
        saga_id, event = parse_abort((), kwargs)
    except InvalidRequest:
        engine.dispose()
        return  # refused where it arrives, naming the field: what the review asks for
    assert DBAPIError in DB_OUTAGE_RETRY["autoretry_for"]  # what saga.abort retries forever
    try:
        outcome = saga_engine.handle(saga_id, event)
    except DBAPIError as exc:
        pytest.fail(f"saga.abort would retry this message forever: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()
    assert outcome.changed
