"""`order_workflow`: what a linear saga cannot do (DESIGN section 8).

validate_order -> a parallel group `checks` of reserve_funds and check_limits -> the wait
await_approval (signal `approval` with payload `{"approved": true|false}`, one hour at most;
`false` or the timeout fails it) -> book_trade. A rollback compensates both branches, then
validate_order. `example_orders` holds one row per saga: `reserved`, `booked`, `released`.
The fault-injection keys of `backtest_workflow` apply to these steps too.

Its business key (`saga-worker list --key`) is the context's `order_ref` when that is a
string: the demo and the tests start orders with one. An order without it has no key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..core.definition import SagaDefinition, Step, StepInput
from ..core.retry import RetryPolicy
from ..core.stages import Parallel, WaitFor
from ..errors import NonRetryableStepError
from ..registry import register
from .faults import after_effect, inject
from .tables import db, example_orders

log = logging.getLogger(__name__)

#: check_limits refuses orders above this amount unless the context sets `limit`.
DEFAULT_LIMIT = 1_000_000.0


def _amount(call: StepInput) -> float:
    value = call.context.get("amount")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NonRetryableStepError("context.amount must be a number")
    if not math.isfinite(value) or not 0 < value < 1e15:
        raise NonRetryableStepError(f"context.amount must be > 0 and finite, got {value!r}")
    return float(value)


def validate_order(call: StepInput) -> dict[str, Any]:
    """Check the order's amount (a bad one fails at once: retrying cannot fix it)."""
    inject(call)
    amount = _amount(call)
    after_effect(call)
    return {"amount": amount, "validated": True}


def invalidate_order(call: StepInput) -> dict[str, Any]:
    inject(call)
    return {"validated": False}


def reserve_funds(call: StepInput) -> dict[str, Any]:
    """Insert this saga's order as `reserved` (once, however often it is delivered)."""
    inject(call)
    engine = db()
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    with engine.begin() as conn:
        conn.execute(
            insert(example_orders)
            .values(
                saga_id=call.saga_id,
                amount=_amount(call),
                status="reserved",
                created_at=datetime.now(UTC),
            )
            .on_conflict_do_nothing()
        )
    after_effect(call)
    return {"reserved": True}


def release_funds(call: StepInput) -> dict[str, Any]:
    """Release the reservation; safe when reserve_funds never took effect (no row)."""
    inject(call)
    with db().begin() as conn:
        conn.execute(
            update(example_orders)
            .where(example_orders.c.saga_id == call.saga_id)
            .values(status="released")
        )
    return {"reserved": False}


def check_limits(call: StepInput) -> dict[str, Any]:
    """Refuse an amount above the limit (context `limit`, default 1,000,000)."""
    inject(call)
    limit = call.context.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise NonRetryableStepError("context.limit must be a number")
    if _amount(call) > limit:
        raise NonRetryableStepError(f"amount {_amount(call)} is above the limit {limit}")
    after_effect(call)
    return {"limits_checked": True}


def clear_limit_check(call: StepInput) -> dict[str, Any]:
    inject(call)
    return {"limits_checked": False}


def book_trade(call: StepInput) -> dict[str, Any]:
    """Book the approved order."""
    inject(call)
    with db().begin() as conn:
        conn.execute(
            update(example_orders)
            .where(example_orders.c.saga_id == call.saga_id, example_orders.c.status != "released")
            .values(status="booked")
        )
    after_effect(call)
    return {"booked": True}


def unbook_trade(call: StepInput) -> dict[str, Any]:
    """Undo the booking: the order is only reserved again (reserve_funds' compensation
    releases it next)."""
    inject(call)
    with db().begin() as conn:
        conn.execute(
            update(example_orders)
            .where(example_orders.c.saga_id == call.saga_id, example_orders.c.status == "booked")
            .values(status="reserved")
        )
    return {"booked": False}


def order_ref(context: Mapping[str, Any]) -> str | None:
    """The order's own reference, when the producer gave one: what operators search by.

    The function form of `business_key` (`business_key="order_ref"` would do the same for
    a string, and take an integer too): references are text here.
    """
    ref = context.get("order_ref")
    return ref if isinstance(ref, str) else None


_policy = RetryPolicy(
    max_attempts=3, initial_delay_seconds=0.5, backoff_factor=2.0, max_delay_seconds=5.0
)


def _step(name: str, action: Any, compensate: Any) -> Step:
    return Step(name, action, compensate=compensate, retry=_policy, timeout_seconds=30)


order_workflow = register(
    SagaDefinition(
        "order_workflow",
        [
            _step("validate_order", validate_order, invalidate_order),
            Parallel(
                "checks",
                [
                    _step("reserve_funds", reserve_funds, release_funds),
                    _step("check_limits", check_limits, clear_limit_check),
                ],
            ),
            WaitFor("await_approval", signal="approval", timeout_seconds=3600, require="approved"),
            _step("book_trade", book_trade, unbook_trade),
        ],
        business_key=order_ref,
    )
)

try:  # the demo table is created when a worker imports this module (docs/contract.md)
    db()
except Exception as exc:  # a missing database must not break importing the definition
    log.warning("example_orders not created yet: %s", type(exc).__name__)
