"""The peer: a DBOS workflow of three steps doing the same trivial work.

Two modes, both on the benchmark's PostgreSQL (database ``bench_dbos``):

- ``python -m bench.dbos_app start --out FILE``: one DBOS process that starts workflows
  in-process with ``DBOS.start_workflow`` and measures them (DBOS's own model: the
  application process runs its workflows), writing the results as JSON;
- ``python -m bench.dbos_app worker``: a DBOS process serving the queue ``bench_queue``,
  fed by a separate client process (the driver, through ``DBOSClient.enqueue``).

The workflow pushes its id onto the Redis list BENCH_DONE_KEY as its last statement. DBOS
records the workflow's outcome after the function returns, so that last write is not inside
the measured latency (it is inside the write and WAL counts, and it keeps the executor
busy, so it is inside the throughput); the start mode also reports the latency to
``get_result()``, which includes it.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from typing import Any

from dbos import DBOS, DBOSConfig, SetWorkflowID

from .common import (
    CpuMeter,
    DoneList,
    PgProbe,
    as_json,
    percentile,
    redis_client,
    run_burst,
    run_serial,
    write_json,
)

QUEUE = "bench_queue"
WORKFLOW = "bench_workflow"
APP_NAME = "bench"

_redis = redis_client() if os.environ.get("BENCH_REDIS_URL") else None
DONE_KEY = os.environ.get("BENCH_DONE_KEY", "bench:done:dbos")


@DBOS.step()  # type: ignore[untyped-decorator, unused-ignore]
def reserve(n: int) -> int:
    return n + 1


@DBOS.step()  # type: ignore[untyped-decorator, unused-ignore]
def compute(a: int) -> int:
    return a * 2


@DBOS.step()  # type: ignore[untyped-decorator, unused-ignore]
def record(b: int) -> int:
    return b + 3


@DBOS.workflow(name=WORKFLOW)  # type: ignore[untyped-decorator, unused-ignore]
def bench_workflow(unit_id: str, n: int) -> int:
    result: int = record(compute(reserve(n)))
    if _redis is not None:
        _redis.rpush(DONE_KEY, f"{unit_id} {time.time():.6f}")
    return result


def config(url: str) -> DBOSConfig:
    threads = int(os.environ.get("BENCH_DBOS_THREADS", "32"))
    return {
        "name": APP_NAME,
        "system_database_url": url,
        "max_executor_threads": threads,
        "log_level": os.environ.get("BENCH_DBOS_LOG_LEVEL", "WARNING"),
        "sys_db_pool_size": max(10, threads + 4),
    }


def launch(url: str) -> None:
    DBOS(config=config(url))
    DBOS.launch()


def serve_queue(url: str) -> None:
    """Launch DBOS, register the queue (after launch, as DBOS 3.4 requires), serve it."""
    launch(url)
    DBOS.register_queue(
        QUEUE,
        worker_concurrency=int(os.environ.get("BENCH_DBOS_WORKER_CONCURRENCY", "32")),
        polling_interval_sec=float(os.environ.get("BENCH_DBOS_POLL_SECONDS", "0.01")),
        on_conflict="always_update",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("dbos queue worker ready", flush=True)
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)


def measure_start_mode(url: str, tag: str, n: int, serial: int, warmup: int) -> dict[str, Any]:
    """Warm-up, burst and serial latency of DBOS.start_workflow in this very process."""
    launch(url)
    done = DoneList(redis_client(), DONE_KEY)
    probe = PgProbe(url)
    handles: dict[str, Any] = {}

    def send(unit_id: str) -> None:
        with SetWorkflowID(unit_id):
            handles[unit_id] = DBOS.start_workflow(bench_workflow, unit_id, 1)

    timeout = 60 + n / 10
    run_burst(send, [f"{tag}-w{i}" for i in range(warmup)], done, probe, timeout)
    # This process is both the producer and the system under test.
    cpu = CpuMeter({os.getpgrp()}, driver_pid=-1)
    burst = run_burst(send, [f"{tag}-b{i}" for i in range(n)], done, probe, timeout, cpu)
    serial_result = run_serial(send, [f"{tag}-s{i}" for i in range(serial)], done, 30)
    # The same, waiting for get_result(): includes DBOS's final outcome write.
    with_outcome: list[float] = []
    for i in range(serial):
        unit_id = f"{tag}-r{i}"
        sent = time.time()
        with SetWorkflowID(unit_id):
            DBOS.start_workflow(bench_workflow, unit_id, 1).get_result()
        with_outcome.append((time.time() - sent) * 1000)
    probe.close()
    DBOS.destroy(workflow_completion_timeout_sec=5)
    return {
        "burst": as_json(burst),
        "serial": as_json(serial_result),
        "serial_with_outcome_p50_ms": percentile(with_outcome, 50),
        "serial_with_outcome_p99_ms": percentile(with_outcome, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["start", "worker"])
    parser.add_argument("--url", default=os.environ.get("BENCH_DBOS_URL"))
    parser.add_argument("--tag", default="dbos")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--serial", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not args.url:
        parser.error("--url or BENCH_DBOS_URL is required")
    if args.mode == "worker":
        serve_queue(args.url)
        return
    result = measure_start_mode(args.url, args.tag, args.n, args.serial, args.warmup)
    if args.out:
        from pathlib import Path

        write_json(Path(args.out), result)
    else:
        print(result)


if __name__ == "__main__":
    main()
