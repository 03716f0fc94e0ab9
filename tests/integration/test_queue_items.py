"""Raw items on the saga queue's Redis list, as anyone who can write to the broker can push.

Each is dropped and logged once; the worker stays up and the queue keeps moving. These are
the items that escaped the guard of worker/broker.py before (issue 14: a KeyError in kombu's
QoS, a wedged reconnect loop, a TypeError, an unknown body encoding, a RecursionError).
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Queue

from tests.waiting import wait_for

from .conftest import Stack

pytestmark = pytest.mark.integration

SAGA_TYPE = "backtest_workflow"


def _template(stack: Stack) -> dict[str, Any]:
    """A real kombu envelope of a saga.start, taken off a scratch queue's list."""
    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    with Connection(stack.broker_url) as conn:
        conn.Producer().publish(
            json.dumps([[], {"saga_type": SAGA_TYPE, "context": {"strategy_id": 1}}, {}]),
            routing_key=scratch,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "saga.start", "id": str(uuid.uuid4()), "lang": "py"},
            declare=[Queue(scratch)],
        )
    client = redis.Redis.from_url(stack.broker_url)
    raw = client.rpop(scratch)
    client.close()
    assert isinstance(raw, bytes)
    envelope = json.loads(raw)
    assert isinstance(envelope, dict)
    return envelope


def _variant(template: dict[str, Any], change: Any) -> bytes:
    envelope = copy.deepcopy(template)
    change(envelope)
    return json.dumps(envelope).encode()


def test_hostile_queue_items_are_dropped_and_the_worker_keeps_serving(stack: Stack) -> None:
    worker = stack.workers[0]
    template = _template(stack)
    items = {
        "no delivery_info": _variant(template, lambda e: e["properties"].pop("delivery_info")),
        "no id header": _variant(template, lambda e: e["headers"].pop("id")),
        "task header is a list": _variant(template, lambda e: e["headers"].update(task=[])),
        "unknown body_encoding": _variant(
            template, lambda e: e["properties"].update(body_encoding="rot13")
        ),
        "delivery_tag is a list": _variant(
            template, lambda e: e["properties"].update(delivery_tag=[])
        ),
        "no headers": _variant(template, lambda e: e.pop("headers")),
        "deep nesting": b"[" * 200_000,
    }
    client = redis.Redis.from_url(stack.broker_url)
    log_start = worker.log_path.stat().st_size
    client.lpush(stack.queue, *items.values())
    client.close()
    good = [stack.start(SAGA_TYPE, {"strategy_id": i}) for i in range(3)]
    final = stack.wait_all(good, timeout=90)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}
    assert worker.process.poll() is None, worker.log_tail()

    def new_text() -> str:
        with worker.log_path.open("rb") as log:
            log.seek(log_start)
            return log.read().decode(errors="replace")

    def handled() -> int:
        text = new_text()
        # A message without headers is Celery's own case: it logs and deletes it.
        return text.count("dropped") + text.count("Received and deleted unknown message")

    wait_for(
        lambda: handled() == len(items),
        30,
        f"{len(items)} dropped queue items to be logged",
        details=lambda: worker.log_tail(80),
    )
    text = new_text()
    assert "Unrecoverable error" not in text
    assert "Traceback" not in text, worker.log_tail(80)
