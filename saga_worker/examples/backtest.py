"""`backtest_workflow`: create a backtest row, run a strategy, save its results.

Each effect is keyed by the saga (one row per saga_id, inserted with ON CONFLICT DO
NOTHING), so a redelivered step changes nothing. Fault injection comes from the context:
``fail_step``, ``flaky_step``, ``slow_step``, ``slow_after_step`` (the effect happens, then
the attempt sleeps: a timeout leaves an unknown outcome) and ``fail_compensation``.
"""

from __future__ import annotations

import logging
import math
import random
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..core.definition import SagaDefinition, Step, StepInput
from ..core.retry import RetryPolicy
from ..registry import register
from .faults import InjectedFailure, after_effect, inject
from .tables import create_tables, db, example_backtests

__all__ = ["backtest_workflow", "create_tables", "example_backtests", "simulate"]

log = logging.getLogger(__name__)


def _strategy_id(call: StepInput) -> int:
    value = call.context.get("strategy_id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InjectedFailure("context.strategy_id must be an integer")
    return value


def create_backtest(call: StepInput) -> dict[str, Any]:
    """Insert this saga's backtest row (once, however often it is delivered)."""
    inject(call)
    engine = db()
    values = {
        "saga_id": call.saga_id,
        "strategy_id": _strategy_id(call),
        "results": None,
        "created_at": datetime.now(UTC),
    }
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    with engine.begin() as conn:
        conn.execute(insert(example_backtests).values(**values).on_conflict_do_nothing())
        row_id = conn.execute(
            select(example_backtests.c.id).where(example_backtests.c.saga_id == call.saga_id)
        ).scalar_one()
    after_effect(call)
    return {"backtest_id": row_id}


def delete_backtest(call: StepInput) -> dict[str, Any]:
    inject(call)
    with db().begin() as conn:
        conn.execute(delete(example_backtests).where(example_backtests.c.saga_id == call.saga_id))
    return {"backtest_id": None}


def run_strategy(call: StepInput) -> dict[str, Any]:
    """Deterministic moving-average crossover over synthetic prices seeded by strategy_id."""
    inject(call)
    results = simulate(_strategy_id(call))
    after_effect(call)
    return {"results": results}


def clear_results(call: StepInput) -> dict[str, Any]:
    inject(call)
    return {"results": None}


def save_results(call: StepInput) -> dict[str, Any]:
    inject(call)
    with db().begin() as conn:
        conn.execute(
            update(example_backtests)
            .where(example_backtests.c.saga_id == call.saga_id)
            .values(results=call.context.get("results"))
        )
    after_effect(call)
    return {"saved": True}


def unsave_results(call: StepInput) -> dict[str, Any]:
    inject(call)
    with db().begin() as conn:
        conn.execute(
            update(example_backtests)
            .where(example_backtests.c.saga_id == call.saga_id)
            .values(results=None)
        )
    return {"saved": False}


def simulate(strategy_id: int, days: int = 250) -> dict[str, Any]:
    """Backtest results that depend only on `strategy_id`."""
    rng = random.Random(strategy_id)
    prices = [100.0]
    for _ in range(days - 1):
        prices.append(prices[-1] * math.exp(rng.gauss(0.0003, 0.012)))
    fast, slow = 5 + strategy_id % 10, 20 + strategy_id % 30
    equity, position, trades, peak, drawdown = 1.0, 0, 0, 1.0, 0.0
    for day in range(slow, days):
        if position:
            equity *= prices[day] / prices[day - 1]
        fast_ma = sum(prices[day - fast : day]) / fast
        slow_ma = sum(prices[day - slow : day]) / slow
        wanted = 1 if fast_ma > slow_ma else 0
        if wanted != position:
            trades += 1
            position = wanted
        peak = max(peak, equity)
        drawdown = max(drawdown, 1 - equity / peak)
    return {
        "strategy_id": strategy_id,
        "days": days,
        "trades": trades,
        "total_return": round(equity - 1, 6),
        "max_drawdown": round(drawdown, 6),
    }


_policy = RetryPolicy(
    max_attempts=3, initial_delay_seconds=0.5, backoff_factor=2.0, max_delay_seconds=5.0
)

backtest_workflow = register(
    SagaDefinition(
        "backtest_workflow",
        [
            Step(
                "create_backtest",
                create_backtest,
                compensate=delete_backtest,
                retry=_policy,
                timeout_seconds=30,
            ),
            Step(
                "run_strategy",
                run_strategy,
                compensate=clear_results,
                retry=_policy,
                timeout_seconds=30,
            ),
            Step(
                "save_results",
                save_results,
                compensate=unsave_results,
                retry=_policy,
                timeout_seconds=30,
            ),
        ],
    )
)

try:  # the demo table is created when a worker imports this module (docs/contract.md)
    db()
except Exception as exc:  # a missing database must not break importing the definition
    log.warning("example_backtests not created yet: %s", type(exc).__name__)
