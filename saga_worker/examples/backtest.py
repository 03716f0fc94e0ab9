"""`backtest_workflow`: create a backtest row, run a strategy, save its results.

Each effect is keyed by the saga (one row per saga_id, inserted with ON CONFLICT DO
NOTHING), so a redelivered step changes nothing. Fault injection comes from the context:
``fail_step``, ``flaky_step``, ``slow_step``, ``slow_after_step`` (the effect happens, then
the attempt sleeps: a timeout leaves an unknown outcome) and ``fail_compensation``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..config import Settings
from ..core.definition import SagaDefinition, Step, StepInput
from ..core.retry import RetryPolicy
from ..registry import register
from ..store.connect import create_db_engine
from ..store.tables import UTCDateTime

log = logging.getLogger(__name__)

metadata = MetaData()
example_backtests = Table(
    "example_backtests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("saga_id", String(255), nullable=False, unique=True),
    Column("strategy_id", Integer, nullable=False),
    Column("results", JSON),
    Column("created_at", UTCDateTime, nullable=False),
)


class InjectedFailure(RuntimeError):
    """Raised by the example steps when the context asks for a failure."""


_engine_lock = threading.Lock()
_engine: tuple[int, Engine] | None = None


def _db() -> Engine:
    """This process's engine for the demo table (prefork children each build their own)."""
    global _engine
    pid = os.getpid()
    if _engine is None or _engine[0] != pid:
        with _engine_lock:
            if _engine is None or _engine[0] != pid:
                # Pre-ping: each pool process would otherwise fail one step attempt on a
                # connection left from before a database restart, and a step has 3 attempts.
                engine = create_db_engine(Settings.from_env().database_url, pre_ping=True)
                metadata.create_all(engine, checkfirst=True)
                _engine = (pid, engine)
    return _engine[1]


def create_tables(engine: Engine) -> tuple[str, ...]:
    """Create the demo tables when missing; returns their names.

    Workers create them on first use too, but a run-time role without CREATE cannot: run
    this as the owner (`saga-worker db grant ROLE --examples` does) before such workers start.
    """
    metadata.create_all(engine, checkfirst=True)
    return tuple(metadata.tables)


def _inject(call: StepInput) -> None:
    ctx = call.context
    compensating = call.direction.value == "compensate"
    slow = ctx.get("slow_step")
    if isinstance(slow, Mapping) and slow.get("step") == call.step_name and not compensating:
        time.sleep(float(slow.get("seconds", 0)))
    if compensating:
        if ctx.get("fail_compensation") == call.step_name:
            raise InjectedFailure(f"injected failure of {call.step_name}'s compensation")
        return
    if ctx.get("fail_step") == call.step_name:
        raise InjectedFailure(f"injected failure of step {call.step_name}")
    flaky = ctx.get("flaky_step")
    if (
        isinstance(flaky, Mapping)
        and flaky.get("step") == call.step_name
        and call.attempt <= int(flaky.get("failures", 0))
    ):
        raise InjectedFailure(
            f"injected flaky failure {call.attempt} of {flaky.get('failures')} in {call.step_name}"
        )


def _after_effect(call: StepInput) -> None:
    """`slow_after_step`: the step's effect is done; sleep, so a timeout leaves it in place."""
    slow = call.context.get("slow_after_step")
    if (
        isinstance(slow, Mapping)
        and slow.get("step") == call.step_name
        and call.direction.value == "forward"
    ):
        time.sleep(float(slow.get("seconds", 0)))


def _strategy_id(call: StepInput) -> int:
    value = call.context.get("strategy_id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InjectedFailure("context.strategy_id must be an integer")
    return value


def create_backtest(call: StepInput) -> dict[str, Any]:
    """Insert this saga's backtest row (once, however often it is delivered)."""
    _inject(call)
    engine = _db()
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
    _after_effect(call)
    return {"backtest_id": row_id}


def delete_backtest(call: StepInput) -> dict[str, Any]:
    _inject(call)
    with _db().begin() as conn:
        conn.execute(delete(example_backtests).where(example_backtests.c.saga_id == call.saga_id))
    return {"backtest_id": None}


def run_strategy(call: StepInput) -> dict[str, Any]:
    """Deterministic moving-average crossover over synthetic prices seeded by strategy_id."""
    _inject(call)
    results = simulate(_strategy_id(call))
    _after_effect(call)
    return {"results": results}


def clear_results(call: StepInput) -> dict[str, Any]:
    _inject(call)
    return {"results": None}


def save_results(call: StepInput) -> dict[str, Any]:
    _inject(call)
    with _db().begin() as conn:
        conn.execute(
            update(example_backtests)
            .where(example_backtests.c.saga_id == call.saga_id)
            .values(results=call.context.get("results"))
        )
    _after_effect(call)
    return {"saved": True}


def unsave_results(call: StepInput) -> dict[str, Any]:
    _inject(call)
    with _db().begin() as conn:
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
    _db()
except Exception as exc:  # a missing database must not break importing the definition
    log.warning("example_backtests not created yet: %s", type(exc).__name__)
