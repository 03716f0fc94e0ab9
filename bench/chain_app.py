"""The substrate ceiling: a plain Celery chain of three trivial tasks, no database.

Same at-least-once settings as saga_worker's app (acks late, reject on worker lost,
prefetch 1, JSON only, no result backend); the last task pushes the chain's id onto the
Redis list BENCH_DONE_KEY. Run with ``celery -A bench.chain_app worker``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

QUEUE = os.environ.get("BENCH_CHAIN_QUEUE", "bench-chain")

app = Celery("bench_chain", broker=os.environ.get("BENCH_REDIS_URL"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    broker_transport_options={"visibility_timeout": 3600},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_redis: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    # One client per process: prefork children must not share the parent's sockets.
    pid = os.getpid()
    if pid not in _redis:
        _redis[pid] = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _redis[pid]


@app.task(name="bench.chain.reserve")  # type: ignore[untyped-decorator]
def reserve(unit_id: str, n: int) -> dict[str, Any]:
    return {"id": unit_id, "a": n + 1}


@app.task(name="bench.chain.compute")  # type: ignore[untyped-decorator]
def compute(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "b": data["a"] * 2}


@app.task(name="bench.chain.record")  # type: ignore[untyped-decorator]
def record(data: dict[str, Any]) -> dict[str, Any]:
    result = {**data, "c": data["b"] + 3}
    _client().rpush(
        os.environ.get("BENCH_DONE_KEY", "bench:done:celery_chain"),
        f"{data['id']} {time.time():.6f}",
    )
    return result


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _announce_ready(**_: Any) -> None:
    key = os.environ.get("BENCH_READY_KEY")
    if key:
        _client().rpush(key, str(os.getpid()))
