"""saga_worker under load (issue 18): bursts at size, waiting sagas released together, a long
run through one worker, and the bytes per saga it leaves in PostgreSQL.

    bash bench/run.sh scale   # bursts of 1,500 and 10,000, 1,000 waiting, 100,000 through
    bash bench/run.sh scale --small 200 --big 600 --waiting 100 --through 2000 --label scale-smoke

One real worker (`celery -A saga_worker.app worker --pool prefork --concurrency 2`, started
as bench/systems.py starts it) on a freshly migrated database, fed by a plain Celery
producer; finished sagas are signalled on a Redis list (bench/sagas.py's hook), never by
polling PostgreSQL inside a measured window. It reports and never passes or fails on time.
Not bench/scale.py, which times recovery scans and audit reads on SQL-generated tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery

from . import wait_sagas
from .common import (
    SETTLE_SECONDS,
    BurstResult,
    CpuMeter,
    DoneList,
    PgProbe,
    as_json,
    percentile,
    pg_dsn,
    redis_client,
    run_burst,
    servers_from_env,
    write_json,
)
from .footprint import RssSeries, disk_per_saga
from .main import RESULTS, log, meta, prepare_databases
from .sagas import SAGA_TYPE
from .systems import Context, SagaWorker

DONE_KEY = "bench:done:saga_worker"  # where SagaWorker's hook pushes finished sagas
SIGNING_KEY = "saga-worker-benchmark-signing-key-0001"  # as SagaWorker.start sets it


class ScaleWorker(SagaWorker):
    """SagaWorker with the waiting saga registered too."""

    imports = "bench.sagas,bench.wait_sagas"


def timeout_for(n: int) -> float:
    return 120 + n / 5  # as Plan.burst_timeout: a stuck run fails instead of hanging


class Driver:
    """Sends starts and signals to the worker and waits for their completions."""

    def __init__(self, ctx: Context, worker: SagaWorker) -> None:
        assert worker.process is not None
        self.ctx = ctx
        self.worker = worker
        self.producer = Celery("bench-producer", broker=ctx.redis_url, set_as_current=False)
        self.producer.conf.update(task_serializer="json", accept_content=["json"])
        self.done = DoneList(redis_client(ctx.redis_url), DONE_KEY)
        self.probe = PgProbe(ctx.admin_url)
        self.db = psycopg.connect(pg_dsn(worker.url), autocommit=True)
        self.cpu = CpuMeter({worker.process.popen.pid})

    def close(self) -> None:
        self.producer.close()
        self.probe.close()
        self.db.close()

    def start(self, saga_type: str, saga_id: str) -> None:
        self.producer.send_task(
            "saga.start",
            kwargs={"saga_type": saga_type, "context": {"n": 1}, "saga_id": saga_id},
            queue=self.worker.queue,
        )

    def signal(self, saga_id: str) -> None:
        # As a producer sends it (docs/workflows.md#signals): no saga_worker import needed.
        self.producer.send_task(
            "saga.signal",
            kwargs={"saga_id": saga_id, "signal": wait_sagas.SIGNAL, "payload": {"released": True}},
            queue=self.worker.queue,
        )

    def burst(self, tag: str, n: int, cpu: bool = False) -> BurstResult:
        ids = [f"{tag}-{i}" for i in range(n)]
        return run_burst(
            lambda sid: self.start(SAGA_TYPE, sid),
            ids,
            self.done,
            self.probe,
            timeout_for(n),
            self.cpu if cpu else None,
        )

    # -- 1. bursts at size ------------------------------------------------------------

    def bursts(self, small: int, big: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, n in (("small", small), ("big", big)):
            if n <= 0:
                continue
            log(f"burst of {n:,} sagas")
            result = self.burst(f"burst-{name}", n, cpu=True)
            out[name] = {**as_json(result), "commit": self.worker.commit_stats(*result.window)}
            log(f"  {result.throughput:.1f} sagas/s in {result.seconds:.1f}s")
        if "small" in out and "big" in out:
            out["big_over_small"] = out["big"]["throughput"] / out["small"]["throughput"]
        return out

    # -- 2. waiting sagas released together ---------------------------------------------

    def waiting(self, n: int, tag: str = "wait") -> dict[str, Any]:
        ids = [f"{tag}-{i}" for i in range(n)]
        self.done.reset()
        started = time.time()
        for saga_id in ids:
            self.start(wait_sagas.SAGA_TYPE, saga_id)
        sent = time.time()
        self._until_waiting(n, timeout_for(n))  # polls PostgreSQL: outside the measured window
        all_waiting = time.time()
        early = self._done_count()
        listing = self._time_waiting_list()

        before = self.probe.mark()
        signalled: dict[str, float] = {}
        first = time.time()
        for saga_id in ids:
            signalled[saga_id] = time.time()
            self.signal(saga_id)
        signals_sent = time.time()
        finished = self.done.wait_all(n, timeout_for(n))
        time.sleep(SETTLE_SECONDS)
        txns, wal = PgProbe.between(before, self.probe.mark())
        missing = set(ids) - set(finished)
        if missing:
            raise RuntimeError(
                f"{len(missing)} waiting sagas did not complete, e.g. {min(missing)}"
            )
        last = max(finished[s] for s in ids)
        latencies = [(finished[s] - signalled[s]) * 1000 for s in ids]
        return {
            "n": n,
            "start_send_seconds": sent - started,
            "start_until_all_waiting_seconds": all_waiting - started,
            "completed_before_signal": early,
            "waiting_list": listing,
            "signal_send_seconds": signals_sent - first,
            "release_seconds": last - first,
            "release_throughput": n / (last - first),
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p99_ms": percentile(latencies, 99),
            "latency_max_ms": max(latencies),
            "write_txns_per_saga": txns / n,
            "wal_bytes_per_saga": wal / n,
            "commit": self.worker.commit_stats(first, last),
        }

    def _done_count(self) -> int:
        return int(self.done.client.llen(self.done.key))

    def _count_waiting(self) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM saga_checkpoints"
            " WHERE saga_type = %s AND waiting_for IS NOT NULL",
            (wait_sagas.SAGA_TYPE,),
        ).fetchone()
        return int(row[0]) if row else 0

    def _until_waiting(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (count := self._count_waiting()) < n:
            if time.monotonic() > deadline:
                states = self.db.execute(
                    "SELECT state, count(*) FROM saga_checkpoints WHERE saga_type = %s GROUP BY 1",
                    (wait_sagas.SAGA_TYPE,),
                ).fetchall()
                raise TimeoutError(f"{count}/{n} sagas waiting after {timeout:.0f}s: {states}")
            time.sleep(0.25)

    def _time_waiting_list(self, repeats: int = 10) -> dict[str, float]:
        """`saga-worker list --waiting` (SagaClient.list_sagas, page 1 of 20) and the bare
        count, timed in this process while every saga waits."""
        from saga_worker.client import SagaClient
        from saga_worker.config import Settings

        settings = Settings(
            database_url=self.worker.url,
            broker_url=self.ctx.redis_url,
            home=self.ctx.work_dir / "client-home",
            signing_key=SIGNING_KEY,
        )
        client = SagaClient(settings)
        listed, counted = [], []
        try:
            for _ in range(repeats):
                began = time.perf_counter()
                client.list_sagas(waiting=True, page_size=20)
                listed.append((time.perf_counter() - began) * 1000)
                began = time.perf_counter()
                self._count_waiting()
                counted.append((time.perf_counter() - began) * 1000)
        finally:
            client.store.engine.dispose()
        return {
            "list_first_ms": listed[0],
            "list_p50_ms": statistics.median(listed),
            "count_first_ms": counted[0],
            "count_p50_ms": statistics.median(counted),
        }

    # -- 3. many sagas through one worker -----------------------------------------------

    def through(self, total: int, batch: int) -> dict[str, Any]:
        assert self.worker.process is not None
        rss = RssSeries(self.worker.process.popen.pid)
        batches: list[dict[str, float]] = []
        began = time.time()
        done = 0
        while done < total:
            n = min(batch, total - done)
            result = self.burst(f"through-{len(batches)}", n)
            done += n
            sample = rss.sample(done)  # the first one, after one batch, is the baseline
            batches.append(
                {
                    "n": n,
                    "seconds": result.seconds,
                    "throughput": result.throughput,
                    "write_txns_per_saga": result.write_txns_per_unit,
                    "wal_bytes_per_saga": result.wal_bytes_per_unit,
                    "rss_total_kb": sample.total_kb,
                }
            )
            log(
                f"  through {done:,}/{total:,}: {result.throughput:.1f} sagas/s, "
                f"RSS {sample.total_kb / 1024:.1f} MiB (main {sample.main_kb / 1024:.1f})"
            )
        busy = sum(b["seconds"] for b in batches)
        return {
            "n": total,
            "batch": batch,
            "seconds_wall": time.time() - began,
            "seconds_busy": busy,
            # Busy: first send to last finish of each batch, without the pauses between.
            "throughput_busy": total / busy,
            "throughput_wall": total / (time.time() - began),
            "batch_throughput_first": batches[0]["throughput"],
            "batch_throughput_last": batches[-1]["throughput"],
            "batch_throughput_min": min(b["throughput"] for b in batches),
            "rss": rss.summary(),
            "batches": batches,
        }


def pool_settings(ctx: Context, worker: SagaWorker) -> dict[str, Any]:
    """The recycling settings the worker runs with: its app built from the same env, in a
    child process (building the app touches process-wide state such as os.environ)."""
    env = {
        **os.environ,
        "PYTHONPATH": ctx.pythonpath(),
        "SAGA_DATABASE_URL": worker.url,
        "SAGA_BROKER_URL": ctx.redis_url,
        "SAGA_QUEUE": worker.queue,
        "SAGA_IMPORTS": worker.imports,
        "SAGA_SIGNING_KEY": SIGNING_KEY,
        "SAGA_HOME": str(ctx.work_dir / "saga-home"),
    }
    code = (
        "import json\n"
        "from saga_worker.app import app\n"
        "keys = ('worker_max_tasks_per_child', 'worker_max_memory_per_child',\n"
        "        'worker_prefetch_multiplier')\n"
        "print(json.dumps({k: app.conf.get(k) for k in keys}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ctx.work_dir, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"reading the worker's settings failed:\n{out.stderr}")
    settings: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return settings | {"pool": "prefork", "concurrency": 2}


def main() -> int:
    args = parse_args()
    servers = servers_from_env()
    if servers is None:
        return 2
    admin_url, redis_url = servers
    work_dir = Path(tempfile.mkdtemp(prefix="saga-bench-scale-"))
    ctx = Context(admin_url, redis_url, work_dir)
    began = time.monotonic()
    log(f"work dir {work_dir}; scale mode {vars(args)}")
    prepare_databases(ctx)
    report: dict[str, Any] = {"meta": meta(args, ctx), "options": vars(args)}
    worker = ScaleWorker(ctx)
    finished = False
    try:
        report["worker"] = pool_settings(ctx, worker)
        worker.start()
        driver = Driver(ctx, worker)
        try:
            log(f"warm-up: {args.warmup} sagas")
            driver.burst("warmup", args.warmup)
            if args.small > 0 or args.big > 0:
                report["bursts"] = driver.bursts(args.small, args.big)
            if args.waiting > 0:
                driver.waiting(min(20, args.waiting), tag="wait-warmup")
                log(f"{args.waiting:,} waiting sagas released together")
                report["waiting"] = driver.waiting(args.waiting)
            if args.through > 0:
                log(f"{args.through:,} sagas through one worker, {args.batch:,} at a time")
                report["through"] = driver.through(args.through, args.batch)
        finally:
            driver.close()
        # Stopped first: its backends flush their table statistics when they exit.
        worker.stop()
        report["disk"] = disk_per_saga(worker.url)
        finished = True
    finally:
        worker.stop()
        if finished and not args.keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            log(f"logs kept in {work_dir}")
    report["meta"]["total_seconds"] = time.monotonic() - began
    report["meta"]["loadavg_end"] = os.getloadavg()
    path = Path(args.results) / f"{args.label}.json"
    write_json(path, report)
    print_report(report)
    log(f"wrote {path}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1500, help="first burst (0 skips)")
    parser.add_argument("--big", type=int, default=10_000, help="second burst (0 skips)")
    parser.add_argument("--waiting", type=int, default=1000, help="waiting sagas (0 skips)")
    parser.add_argument("--through", type=int, default=100_000, help="long run (0 skips)")
    parser.add_argument(
        "--batch",
        type=int,
        help="sagas per batch of the long run (default: 5,000, fewer below 100,000 so that "
        "a short run still has about 20 samples after its baseline)",
    )
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--label", default="scale", help="file name of the JSON")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--note", default="", help="free text kept in the JSON (conditions)")
    args = parser.parse_args()
    if args.batch is None:
        args.batch = max(1, min(5000, args.through // 20))
    if args.batch < 1:
        parser.error("--batch must be 1 or more")
    return args


def print_report(report: dict[str, Any]) -> None:
    rows = [
        *_burst_rows(report.get("bursts", {})),
        *_waiting_rows(report.get("waiting")),
        *_through_rows(report.get("through")),
        *_disk_rows(report.get("disk")),
    ]
    pool = report.get("worker", {})
    rows.append(
        (
            "pool recycling",
            f"max_tasks_per_child={pool.get('worker_max_tasks_per_child')}, "
            f"max_memory_per_child={pool.get('worker_max_memory_per_child')}",
        )
    )
    width = max(len(label) for label, _ in rows) + 2
    print()
    for label, value in rows:
        print(f"  {label:{width}s}{value}")
    m = report["meta"]
    print(
        f"\n  {m['cpus']} CPUs, load average at start {m['loadavg_start'][0]:.1f}, at end "
        f"{m['loadavg_end'][0]:.1f}; total {m['total_seconds']:.0f}s"
    )


Rows = list[tuple[str, str]]


def _burst_rows(bursts: dict[str, Any]) -> Rows:
    rows: Rows = []
    for name in ("small", "big"):
        if name not in bursts:
            continue
        b, label = bursts[name], f"burst {bursts[name]['n']:,}"
        commit = b["commit"]
        rows += [
            (f"{label}: throughput", f"{b['throughput']:.1f} sagas/s ({b['seconds']:.1f} s)"),
            (f"{label}: commit p50/p99", f"{commit['p50_ms']:.2f} / {commit['p99_ms']:.2f} ms"),
            (f"{label}: per saga", _writes(b["write_txns_per_unit"], b["wal_bytes_per_unit"])),
        ]
    if "big_over_small" in bursts:
        rows.append(("big / small throughput", f"{bursts['big_over_small']:.3f} (target >= 0.90)"))
    return rows


def _waiting_rows(w: dict[str, Any] | None) -> Rows:
    if not w:
        return []
    label, listing = f"waiting {w['n']:,}", w["waiting_list"]
    return [
        (
            f"{label}: start",
            f"sent in {w['start_send_seconds']:.1f} s, "
            f"all waiting after {w['start_until_all_waiting_seconds']:.1f} s",
        ),
        (
            "list --waiting: page / count",
            f"{listing['list_p50_ms']:.2f} / {listing['count_p50_ms']:.2f} ms (p50)",
        ),
        (
            f"{label}: release",
            f"{w['release_throughput']:.1f} sagas/s ({w['release_seconds']:.1f} s)",
        ),
        (
            f"{label}: signal->done p50/p99",
            f"{w['latency_p50_ms']:.0f} / {w['latency_p99_ms']:.0f} ms",
        ),
        (
            f"{label}: per saga (release)",
            _writes(w["write_txns_per_saga"], w["wal_bytes_per_saga"]),
        ),
    ]


def _through_rows(t: dict[str, Any] | None) -> Rows:
    if not t:
        return []
    rss = t["rss"]
    total, main, kids = rss["total"], rss["main"], rss["children"]
    first, last = t["batch_throughput_first"], t["batch_throughput_last"]
    return [
        (
            f"through {t['n']:,}: throughput",
            f"{t['throughput_busy']:.1f} sagas/s busy, {t['throughput_wall']:.1f} wall",
        ),
        (
            "  batch first / last / min",
            f"{first:.1f} / {last:.1f} / {t['batch_throughput_min']:.1f} sagas/s",
        ),
        (
            "  RSS total base/final/max",
            f"{_mib(total['baseline_kb'])} / {_mib(total['final_kb'])} / "
            f"{_mib(total['max_kb'])} ({total['growth_pct']:+.1f}%; target < 10%)",
        ),
        (
            "  RSS main base/final",
            f"{_mib(main['baseline_kb'])} / {_mib(main['final_kb'])} ({main['growth_pct']:+.1f}%)",
        ),
        (
            "  RSS children base/final",
            f"{_mib(kids['baseline_kb'])} / {_mib(kids['final_kb'])} "
            f"({kids['growth_pct']:+.1f}%), {rss['children_replaced']} replaced",
        ),
    ]


def _disk_rows(d: dict[str, Any] | None) -> Rows:
    if not d:
        return []
    rows: Rows = [
        ("sagas in tables", f"{d['sagas']:,}, {d['audit_rows_per_saga']:.2f} audit rows each")
    ]
    for name, tbl in d["tables"].items():
        rows.append(
            (
                f"{name} B/saga",
                f"table {tbl['table_bytes_per_saga']:.0f}, "
                f"indexes {tbl['index_bytes_per_saga']:.0f}, "
                f"total {tbl['total_bytes_per_saga']:.0f}",
            )
        )
        for index, per in tbl["index_bytes_per_saga_by_index"].items():
            rows.append((f"  {index}", f"{per:.0f}"))
    cp = d["tables"]["saga_checkpoints"]
    stale = "" if d["stats_current"] else " (statistics not current)"
    rows.append(
        (
            "checkpoint HOT updates",
            f"{cp['n_tup_hot_upd']:,} of {cp['n_tup_upd']:,} ({cp['hot_update_ratio']:.1%}), "
            f"{cp['n_dead_tup']:,} dead tuples{stale}",
        )
    )
    return rows


def _writes(txns: float, wal: float) -> str:
    return f"{txns:.2f} write txns, {wal / 1024:.1f} KiB WAL"


def _mib(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
