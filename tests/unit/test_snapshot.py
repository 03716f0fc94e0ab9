"""The signed checkpoint a step message carries (saga_worker/worker/snapshot.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from saga_worker.core.model import Attempt, Direction, Saga, SagaState
from saga_worker.store.port import Loaded
from saga_worker.worker import snapshot
from saga_worker.worker.steps import _sent_again

KEY = "k" * 64
T0 = datetime(2026, 11, 27, 9, 30, 0, 123456, tzinfo=UTC)
NOW = 1_800_000_000.0


def checkpoint() -> Loaded:
    saga = Saga(
        saga_id="bt-1",
        saga_type="backtest_workflow",
        state=SagaState.COMPENSATING,
        context={"strategy_id": 42, "note": "naïve ✓", "nested": {"x": [1, 2.5, None]}},
        current_step_index=1,
        total_steps=3,
        started_at=T0,
        updated_at=T0 + timedelta(seconds=2),
        attempts=(
            Attempt(1, Direction.COMPENSATE, 2, T0, T0 + timedelta(seconds=60), 0, False, 1),
        ),
        completed_steps=("create_backtest", "run_strategy"),
        compensated_steps=(),
        failed_compensations=("save_results",),
        error="boom",
        retries=3,
        user_id="u1",
        ip_address="::1",
        abort_requested=True,
        version=7,
    )
    return Loaded(saga, "a" * 64)


def wire(data: dict[str, Any]) -> dict[str, Any]:
    """What the step receives: the message went through JSON."""
    result: dict[str, Any] = json.loads(json.dumps(data))
    return result


def decode(data: object, *, context: Any = None, now: float = NOW, **kw: Any) -> Loaded | None:
    saga = checkpoint().saga
    return snapshot.decode(
        kw.get("key", KEY),
        data,
        saga_id=kw.get("saga_id", saga.saga_id),
        saga_type=kw.get("saga_type", saga.saga_type),
        context=wire(dict(saga.context)) if context is None else context,
        now=now,
        max_age_seconds=30,
    )


def test_round_trip_through_json_gives_the_same_checkpoint() -> None:
    decoded = decode(wire(snapshot.encode(KEY, checkpoint(), NOW - 1)))
    assert decoded == replace(checkpoint(), carried=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", 8),
        ("state", "RUNNING"),
        ("completed_steps", ["create_backtest"]),
        ("audit_head", "b" * 64),
        ("sent_at", NOW),
        ("abort_requested", False),
    ],
)
def test_any_altered_field_is_refused(field: str, value: Any) -> None:
    data = wire(snapshot.encode(KEY, checkpoint(), NOW - 1))
    data[field] = value
    assert decode(data) is None


def test_the_message_fields_it_does_not_repeat_are_signed_too() -> None:
    data = wire(snapshot.encode(KEY, checkpoint(), NOW - 1))
    assert decode(data, saga_id="bt-2") is None
    assert decode(data, saga_type="other") is None
    assert decode(data, context={"strategy_id": 43}) is None
    assert decode(data, key="x" * 64) is None


def test_old_or_future_or_malformed_is_refused() -> None:
    assert decode(wire(snapshot.encode(KEY, checkpoint(), NOW - 31))) is None
    assert decode(wire(snapshot.encode(KEY, checkpoint(), NOW + 5))) is None
    bad: object
    for bad in (None, "x", [], {}, {"mac": 1}, {"mac": "0" * 64}):
        assert decode(bad) is None


def test_a_signed_but_incomplete_checkpoint_is_refused_not_raised() -> None:
    data = wire(snapshot.encode(KEY, checkpoint(), NOW - 1))
    del data["pending"]
    fields = {k: v for k, v in data.items() if k != "mac"}
    saga = checkpoint().saga
    data["mac"] = snapshot._mac(KEY, fields, saga.saga_id, saga.saga_type, dict(saga.context))
    assert decode(data) is None


def test_a_resent_attempt_or_no_attempt_is_not_trusted() -> None:
    saga = checkpoint().saga
    assert saga.pending is not None
    for attempts in ((replace(saga.pending, recoveries=1),), ()):
        loaded = Loaded(replace(saga, attempts=attempts), "c" * 64)
        assert decode(wire(snapshot.encode(KEY, loaded, NOW))) is None


def test_what_cannot_be_canonical_json_or_compared_is_refused_not_raised() -> None:
    data = wire(snapshot.encode(KEY, checkpoint(), NOW - 1))
    assert decode({**data, "mac": "é" * 64}) is None  # compare_digest refuses non-ASCII str
    lone_surrogate = {**wire(dict(checkpoint().saga.context)), "x": "\ud800"}
    assert decode(data, context=lone_surrogate) is None
    deep: dict[str, Any] = {}
    for _ in range(100_000):
        deep = {"d": deep}
    assert decode(data, context=deep) is None


@pytest.mark.parametrize(
    "delivery_info, retries, again",
    [
        ({"redelivered": False}, 0, False),
        (None, 0, False),
        ({"redelivered": True}, 0, True),
        ({}, 2, True),
        ({"redelivered": None}, None, False),
    ],
)
def test_redelivered_or_retried_messages_count_as_sent_again(
    delivery_info: Any, retries: Any, again: bool
) -> None:
    request = SimpleNamespace(delivery_info=delivery_info, retries=retries)
    assert _sent_again(request) is again
