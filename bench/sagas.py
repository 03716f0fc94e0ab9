"""The benchmark saga: three local steps doing trivial work (imported via SAGA_IMPORTS).

Besides registering `bench_saga`, this module adds one engine hook to every worker child
(through `RuntimeFactory.hooks`, before the child builds its runtime). The hook

- appends each committed transition's `commit_seconds` (the one transaction holding the
  checkpoint and its audit rows) to a file per process under BENCH_TIMING_DIR, and
- pushes the saga onto the Redis list BENCH_DONE_KEY once its COMPLETED transition is
  committed, which is how the driver learns a saga finished without polling PostgreSQL.

Nothing here changes what the engine does; without the BENCH_* variables the hook is inert.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import signals

from saga_worker import SagaDefinition, SagaState, Step, StepInput, register
from saga_worker.engine import TransitionRecord

SAGA_TYPE = "bench_saga"


def reserve(call: StepInput) -> dict[str, Any]:
    return {"a": int(call.context["n"]) + 1}


def compute(call: StepInput) -> dict[str, Any]:
    return {"b": int(call.context["a"]) * 2}


def record(call: StepInput) -> dict[str, Any]:
    return {"c": int(call.context["b"]) + 3}


DEFINITION = register(
    SagaDefinition(
        SAGA_TYPE,
        [Step("reserve", reserve), Step("compute", compute), Step("record", record)],
    )
)


class BenchHook:
    """Commit timings to a per-process file; completion signals to a Redis list."""

    def __init__(self, timing_dir: str | None, redis_url: str | None, done_key: str) -> None:
        self.fd: int | None = None
        if timing_dir:
            path = os.path.join(timing_dir, f"commit-{os.getpid()}.txt")
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.redis = redis.Redis.from_url(redis_url) if redis_url else None
        self.done_key = done_key

    def on_transition(self, record: TransitionRecord) -> None:
        decision = record.decision
        if not decision.changed:
            return
        if self.fd is not None:
            kind = "start" if record.before is None else "step"
            line = f"{time.time():.6f} {record.commit_seconds:.6f} {kind} {len(decision.audit)}\n"
            os.write(self.fd, line.encode())
        if self.redis is not None and decision.saga.state is SagaState.COMPLETED:
            self.redis.rpush(self.done_key, f"{decision.saga.saga_id} {time.time():.6f}")


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _announce_ready(**_: Any) -> None:
    key = os.environ.get("BENCH_READY_KEY")
    if key and os.environ.get("BENCH_REDIS_URL"):
        redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]).rpush(key, str(os.getpid()))


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _install_hook(**_: Any) -> None:
    if not (os.environ.get("BENCH_TIMING_DIR") or os.environ.get("BENCH_REDIS_URL")):
        return
    from saga_worker.app import app

    hook = BenchHook(
        os.environ.get("BENCH_TIMING_DIR"),
        os.environ.get("BENCH_REDIS_URL"),
        os.environ.get("BENCH_DONE_KEY", "bench:done:saga_worker"),
    )
    factory = app.saga_runtimes
    factory.hooks.append(hook)
    runtime = getattr(factory, "_runtime", None)
    if runtime is not None and getattr(factory, "_pid", None) == os.getpid():
        runtime.engine.hooks.append(hook)  # built already in this process: add it there too
