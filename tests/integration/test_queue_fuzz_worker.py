"""Hypothesis-generated raw items on the saga queue of a real worker (issue 14, item 1).

The transport-level fuzz (tests/unit/test_queue_fuzz.py) checks each item in depth; this one
pushes a few hundred of its items onto the queue of a real `celery worker` on redis://,
rediss:// and amqp://, then starts good sagas behind them. They must complete, the worker must
keep its PID, and its log must show no "Unrecoverable error" and no traceback other than
those Celery prints for the invalid messages it handles itself.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.entity import Queue

from tests.unit.test_queue_fuzz import BODIES, FRAGMENTS, HEADER_NAMES, ITEMS, Envelope
from tests.waiting import wait_for

from .conftest import Stack, WorkerProcess, fresh_postgres_database
from .test_redis_variants import (  # noqa: F401 (tls_redis: a fixture)
    Variant,
    VariantRig,
    tls_redis,
    wait_completed,
)

pytestmark = pytest.mark.integration

ITEM_COUNT = 300
# An unknown saga type: an item that is a well-formed start is refused quickly by saga.start,
# rather than running a whole saga.
BODY = [[], {"saga_type": "fuzz_no_such_saga", "context": {}}, {}]
# Where Celery itself logs a message it refused, with a traceback of the refusal.
HANDLED = ("Received invalid task message", "Can't decode message body", "Received unregistered")
RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [^]]*\] ", re.MULTILINE)


def _collect(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` examples of `strategy`, the same ones every run."""
    found: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


def _template(broker_url: str, queue: str) -> dict[str, Any]:
    """A real kombu envelope for the Redis list of `queue`, taken off a scratch list (the
    envelope is the same on redis:// and rediss://)."""
    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    with Connection(broker_url) as conn:
        conn.Producer().publish(
            json.dumps(BODY),
            routing_key=scratch,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "saga.start", "id": "template", "lang": "py"},
            declare=[Queue(scratch)],
        )
        raw = conn.default_channel.client.rpop(scratch)
    assert isinstance(raw, bytes)
    envelope: dict[str, Any] = json.loads(raw)
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    return envelope


def _redis_items(template: dict[str, Any]) -> list[bytes]:
    return [
        item.render(template) if isinstance(item, Envelope) else item
        for item in _collect(ITEMS, ITEM_COUNT)
    ]


def _check_worker(worker: WorkerProcess, pid: int, log_start: int) -> str:
    assert worker.process.poll() is None, worker.log_tail()
    assert worker.process.pid == pid
    with worker.log_path.open("rb") as log:
        log.seek(log_start)
        text = log.read().decode(errors="replace")
    assert "Unrecoverable error" not in text, worker.log_tail(120)
    starts = [m.start() for m in RECORD.finditer(text)] + [len(text)]
    for begin, end in itertools.pairwise(starts):
        record = text[begin:end]
        if "Traceback" in record:
            first = record.splitlines()[0]
            assert any(phrase in first for phrase in HANDLED), record[:3000]
    return text


def _run(
    worker: WorkerProcess,
    push: Callable[[], int],
    start: Callable[[int], str],
    wait: Callable[[str], None],
) -> int:
    """Push the items, then good sagas behind them; returns how many items were pushed."""
    pid = worker.process.pid
    log_start = worker.log_path.stat().st_size
    pushed = push()
    for saga_id in [start(n) for n in range(3)]:
        wait(saga_id)
    text = _check_worker(worker, pid, log_start)
    assert "dropped" in text
    print(f"fuzzed {pushed} raw items")  # read with pytest -s
    return pushed


@pytest.mark.parametrize("stack", ["postgres"], indirect=True)
def test_a_real_worker_on_redis_survives_hypothesis_items(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.broker_url)
    items = _redis_items(_template(stack.broker_url, stack.queue))

    def push() -> int:
        for item in items:
            client.lpush(stack.queue, item)
        return len(items)

    def wait(saga_id: str) -> None:
        assert stack.wait(saga_id, timeout=120).state.value == "COMPLETED"

    try:
        assert _run(stack.workers[0], push, _starter(stack), wait) >= ITEM_COUNT * 0.9
        wait_for(lambda: client.llen(stack.queue) == 0, 30, "the saga queue to be drained")
    finally:
        client.close()


def _starter(stack: Stack) -> Callable[[int], str]:
    return lambda n: stack.start("backtest_workflow", {"strategy_id": n})


def test_a_real_worker_on_rediss_survives_hypothesis_items(
    tls_redis: Variant,  # noqa: F811 (the fixture imported above)
    broker_url: str,
    pg_admin_url: str,
    tmp_path: Path,
) -> None:
    variant = tls_redis
    rig = VariantRig.start(variant, fresh_postgres_database(pg_admin_url), tmp_path, "fz")
    try:
        items = _redis_items(_template(broker_url, rig.queue))

        def push() -> int:
            for item in items:
                variant.raw.lpush(rig.queue, item)
            return len(items)

        def wait(saga_id: str) -> None:
            wait_completed(rig.store, saga_id, timeout=120)

        assert _run(rig.worker, push, rig.start_saga, wait) >= ITEM_COUNT * 0.9
    finally:
        rig.close()


# -- RabbitMQ: the same fuzz, as AMQP messages ---------------------------------------------

_header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["saga.start", "", "py", "application/x-gzip", "zlib", "x-nope"]),
    st.lists(st.text(max_size=5) | st.integers(0, 10), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
AMQP_MESSAGES = st.fixed_dictionaries(
    {
        "body": st.one_of(
            BODIES.map(base64.b64decode),
            st.binary(max_size=200),
            FRAGMENTS.filter(lambda f: len(f) < 120_000).map(
                lambda f: f.encode("utf-8", "surrogatepass")
            ),
        ),
        "content_type": st.sampled_from(
            ["application/json", "application/x-python-serialize", "text/plain", "", "x/\x00"]
        ),
        "content_encoding": st.sampled_from(["utf-8", "binary", "x-nope", "utf-8\x00", ""]),
        "drop": st.lists(st.sampled_from(["task", "id", "lang"]), max_size=2),
        "headers": st.dictionaries(st.sampled_from(HEADER_NAMES), _header_values, max_size=4),
        "priority": st.none() | st.integers(0, 255),
        "correlation_id": st.none() | st.text(max_size=20),
    }
)


@pytest.mark.parametrize("stack", ["rabbitmq"], indirect=True)
def test_a_real_worker_on_rabbitmq_survives_hypothesis_messages(stack: Stack) -> None:
    messages = _collect(AMQP_MESSAGES, ITEM_COUNT)

    def push() -> int:
        pushed = 0
        with Connection(stack.broker_url) as conn:
            producer = conn.Producer()
            for message in messages:
                headers = {"task": "saga.start", "id": uuid.uuid4().hex, "lang": "py"}
                for name in message["drop"]:
                    headers.pop(name, None)
                headers.update(message["headers"])
                extra = {
                    key: message[key]
                    for key in ("priority", "correlation_id")
                    if message[key] is not None
                }
                try:
                    producer.publish(
                        message["body"],
                        exchange="",
                        routing_key=stack.queue,
                        content_type=message["content_type"],
                        content_encoding=message["content_encoding"],
                        headers=headers,
                        **extra,
                    )
                except (ValueError, TypeError, OverflowError, UnicodeError):
                    continue  # py-amqp cannot encode it: nobody can publish it either
                pushed += 1
        return pushed

    def wait(saga_id: str) -> None:
        assert stack.wait(saga_id, timeout=120).state.value == "COMPLETED"

    assert _run(stack.workers[0], push, _starter(stack), wait) >= ITEM_COUNT * 0.8
