"""What remote steps show in task events (Flower), and remote services that default to pickle.

Real workers started with -E (the saga worker and a remote service using saga_remote); task
events are read off the broker by a real Celery event receiver, as Flower does.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text

from saga_worker.audit.redaction import Redactor
from saga_worker.core.model import Saga
from saga_worker.store.connect import create_db_engine
from saga_worker.store.repository import SagaStore
from saga_worker.tokens import attempt_token
from tests.waiting import wait_for

from .conftest import WORKER_IMPORTS, WorkerProcess, fresh_postgres_database, start_worker

pytestmark = pytest.mark.integration

SIGNING_KEY = "it-remote-events-" + "k" * 48
SECRETS = ("hunter2", "sk_live_abc")


@dataclass
class Remote:
    queue: str
    store: SagaStore
    producer: Celery
    workers: list[WorkerProcess]
    admin_url: str
    database_url: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def start(self, context: dict[str, Any], saga_type: str = "it_remote") -> str:
        saga_id = f"ev-{uuid.uuid4().hex[:12]}"
        self.producer.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": context, "saga_id": saga_id},
            queue=self.queue,
        )
        return saga_id

    def wait(self, saga_id: str, timeout: float = 60) -> Saga:
        return wait_for(
            lambda: saga if (saga := self.store.load(saga_id)) and saga.state.is_terminal else None,
            timeout,
            f"saga {saga_id} to settle",
            details=lambda: "\n---\n".join(w.log_tail(40) for w in self.workers),
        )

    def allow_connections(self, allow: bool) -> None:
        """Take the saga database away from everyone (or give it back)."""
        name = self.database_url.rsplit("/", 1)[1]
        admin = create_db_engine(self.admin_url, pool=False).execution_options(
            isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
            if not allow:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
        admin.dispose()

    def quote_rows(self, saga_id: str) -> list[dict[str, Any]]:
        return [r for r in self.store.audit_trail(saga_id) if r["step_name"] == "quote"]


def _receive(app: Celery, events: list[dict[str, Any]], stop: threading.Event) -> None:
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": events.append})
        while not stop.is_set():
            try:
                receiver.capture(limit=None, timeout=1, wakeup=False)
            except TimeoutError:
                continue
            except Exception:
                if stop.is_set():
                    return
                time.sleep(0.2)  # a broker hiccup: back off, then capture again


def _wait_until_receiving(app: Celery, events: list[dict[str, Any]]) -> None:
    """Send probe events until the receiver records one: its queue is bound from then on."""
    probe = uuid.uuid4().hex
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, enabled=True)
        try:

            def received() -> bool:
                dispatcher.send("test-probe", probe=probe)
                return any(e.get("probe") == probe for e in list(events))

            wait_for(received, 30, "the event receiver to record a probe event", interval=0.2)
        finally:
            dispatcher.close()


@pytest.fixture(scope="module", params=["json", "pickle"])
def remote(
    request: pytest.FixtureRequest,
    broker_url: str,
    pg_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Remote]:
    serializer = request.param
    folder = tmp_path_factory.mktemp(f"remote-events-{serializer}")
    tag = uuid.uuid4().hex[:8]
    queue, remote_queue = f"it-ev-{tag}", f"it-ev-remote-{tag}"
    database_url = fresh_postgres_database(pg_admin_url)
    env = {
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": broker_url,
        "SAGA_QUEUE": queue,
        "SAGA_IMPORTS": WORKER_IMPORTS,
        "SAGA_HOME": str(folder),
        "SAGA_SIGNING_KEY": SIGNING_KEY,
        "IT_REMOTE_QUEUE": remote_queue,
        "IT_REMOTE_BROKER_URL": broker_url,
        "IT_REMOTE_SERIALIZER": serializer,
    }
    listener = Celery("it-ev-listener", broker=broker_url, set_as_current=False)
    producer = Celery("it-ev-producer", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    store = SagaStore(create_db_engine(env["SAGA_DATABASE_URL"]), Redactor([]))
    result = Remote(queue, store, producer, [], pg_admin_url, database_url)
    stop = threading.Event()
    thread = threading.Thread(target=_receive, args=(listener, result.events, stop), daemon=True)
    thread.start()
    try:
        # The receiver's queue is bound before the workers send anything.
        _wait_until_receiving(listener, result.events)
        result.workers.append(
            start_worker("saga_worker.app", env, queue, folder / "worker.log", extra_args=("-E",))
        )
        result.workers.append(
            start_worker(
                "tests.fixtures.remote_service",
                # Celery refuses to accept pickle as root (as in this test container) unless told.
                {**env, "C_FORCE_ROOT": "1"} if serializer == "pickle" else env,
                remote_queue,
                folder / "remote.log",
                concurrency=1,
                extra_args=("-E",),
            )
        )
        yield result
    finally:
        for worker in result.workers:
            worker.stop()
        stop.set()
        thread.join(timeout=5)
        producer.close()
        listener.close()
        store.engine.dispose()


def _tokens(saga_id: str, attempts: int) -> list[str]:
    return [attempt_token(SIGNING_KEY, saga_id, 1, "forward", n) for n in range(1, attempts + 1)]


def _advance_events(remote: Remote, saga_id: str, messages: int) -> list[dict[str, Any]]:
    """The task events of the `messages` saga.advance messages that carried this saga's
    results, once each of them was received and succeeded."""

    def complete() -> list[dict[str, Any]] | None:
        events = list(remote.events)
        ids = {
            e["uuid"]
            for e in events
            if e.get("type") == "task-received"
            and e.get("name") == "saga.advance"
            and saga_id in str(e.get("kwargs"))
        }
        found = [e for e in events if e.get("uuid") in ids]
        succeeded = {e["uuid"] for e in found if e["type"] == "task-succeeded"}
        return found if len(ids) == messages and succeeded == ids else None

    return wait_for(
        complete,
        30,
        f"the events of {messages} saga.advance message(s) of {saga_id}",
        interval=0.2,
        details=lambda: remote.events[-20:],
    )


@pytest.mark.parametrize("remote", ["json"], indirect=True)
def test_remote_results_show_no_token_or_secret_in_task_events(remote: Remote) -> None:
    ok = remote.start({"qty": 1, "remote_secret_output": True})
    failed = remote.start({"qty": 1, "remote_secret_fail": True})
    assert remote.wait(ok).state.value == "COMPLETED"
    assert remote.wait(failed).state.value == "COMPENSATED"

    for saga_id, attempts in ((ok, 1), (failed, 2)):
        advance = _advance_events(remote, saga_id, attempts)
        shown = repr(advance)
        for secret in SECRETS:
            assert secret not in shown, shown
        everything = repr(remote.events)
        for token in _tokens(saga_id, attempts):
            assert token not in everything

    # The audit trail still has the (redacted) error.
    rows = remote.quote_rows(failed)
    assert [r["event_type"] for r in rows] == [
        "step_start",
        "step_retry",
        "step_start",
        "step_failed",
    ]
    for row in (rows[1], rows[3]):
        assert row["event_data"]["error_type"] == "RuntimeError"
        assert "pricing refused" in row["error_message"]
        assert "Traceback" in row["error_stack_trace"]
        for secret in SECRETS:
            assert secret not in row["error_message"] + row["error_stack_trace"]


@pytest.mark.parametrize("remote", ["pickle"], indirect=True)
def test_remote_service_defaulting_to_pickle_still_reaches_the_saga(remote: Remote) -> None:
    ok = remote.start({"qty": 5})
    saga = remote.wait(ok)
    assert saga.state.value == "COMPLETED", saga.error
    assert saga.context["price"] == 110

    failed = remote.start({"qty": 1, "remote_decline": "final"})
    saga = remote.wait(failed)
    assert saga.state.value == "COMPENSATED"
    rows = remote.quote_rows(failed)
    assert [r["event_type"] for r in rows] == ["step_start", "step_failed"]
    assert rows[1]["event_data"]["error_type"] == "CardReported"
    assert "reported stolen" in rows[1]["error_message"]


@pytest.mark.parametrize("remote", ["json"], indirect=True)
def test_result_deferred_while_database_is_down_shows_no_token_or_secret(remote: Remote) -> None:
    ok = remote.start({"sleep": 3}, saga_type="it_deferred")
    failed = remote.start({"sleep": 3, "fail": True}, saga_type="it_deferred")
    wait_for(
        lambda: all(
            "step_start" in [r["event_type"] for r in remote.store.audit_trail(saga_id)]
            for saga_id in (ok, failed)
        ),
        30,
        "both steps to start",
    )
    remote.store.engine.dispose()
    remote.allow_connections(False)
    try:
        # Both steps finish while the database is away: after the engine's own retries (60 s)
        # their results go to saga.advance.
        def deferred() -> bool:
            received = [
                e
                for e in list(remote.events)
                if e.get("type") == "task-received" and e.get("name") == "saga.advance"
            ]
            return all(any(s in str(e.get("kwargs")) for e in received) for s in (ok, failed))

        wait_for(
            deferred,
            100,
            "both results to be deferred to saga.advance",
            interval=0.2,
            details=lambda: remote.workers[0].log_tail(60),
        )
    finally:
        remote.allow_connections(True)
    assert remote.wait(ok).state.value == "COMPLETED"
    assert remote.wait(failed).state.value == "COMPENSATED"
    for saga_id in (ok, failed):
        advance = _advance_events(remote, saga_id, 1)
        shown = repr(advance)
        assert "outcome" in shown, remote.events[-20:]
        for secret in SECRETS:
            assert secret not in shown, shown
        assert attempt_token(SIGNING_KEY, saga_id, 0, "forward", 1) not in repr(remote.events)
    rows = [r for r in remote.store.audit_trail(failed) if r["event_type"] == "step_failed"]
    assert rows and "slow step refused" in rows[-1]["error_message"]
    assert "hunter2" not in rows[-1]["error_message"]


@pytest.mark.parametrize("remote", ["json"], indirect=True)
def test_messages_sent_without_kwargsrepr_show_no_secret_in_task_events(remote: Remote) -> None:
    """A producer's saga.start (send_task sets no kwargsrepr), a retried message (Celery's
    retry drops it) and a hand-made saga.advance carry contexts and tokens in their kwargs:
    the worker shows them redacted in task events, whatever the sender set."""
    secret, fake_token = "producer-secret-5c1f", "e" * 64
    saga_id = f"ev-kw-{uuid.uuid4().hex[:8]}"
    started = remote.producer.send_task(
        "saga.start",
        kwargs={
            "saga_type": "it_remote",
            "saga_id": saga_id,
            "context": {"qty": 1, "password": secret},
        },
        queue=remote.queue,
    )
    advanced = remote.producer.send_task(
        "saga.advance",
        kwargs={
            "saga_id": saga_id,
            "step_index": 0,
            "direction": "forward",
            "attempt": 9,
            "token": fake_token,
            "outcome": "success",
            "output": {"api_key": secret},
        },
        queue=remote.queue,
    )
    assert remote.wait(saga_id).state.value == "COMPLETED"

    def received(task_id: str) -> list[dict[str, Any]]:
        return [
            e
            for e in list(remote.events)
            if e.get("type") == "task-received" and e.get("uuid") == task_id
        ]

    wait_for(
        lambda: received(started.id) and received(advanced.id),
        30,
        "the task-received events of both messages",
    )
    shown = repr(received(started.id) + received(advanced.id))
    assert secret not in shown and fake_token not in shown, shown
