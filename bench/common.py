"""Measurement helpers shared by the driver and the DBOS runner process.

Every system signals "this unit is finished" the same way: the process that finishes it
pushes ``"<unit id> <time.time()>"`` onto a Redis list. The driver never polls PostgreSQL
while a measured window is open (that costs the system under test ~25%).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

#: Settle time after the last unit finished, so trailing commits of the last units
#: (DBOS records a workflow's outcome after its function returned) land in the counters.
SETTLE_SECONDS = 0.5


def pg_dsn(url: str) -> str:
    """A libpq URL from an SQLAlchemy one (drops the ``+psycopg`` driver suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def redis_client(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url or os.environ["BENCH_REDIS_URL"])


def push_done(client: redis.Redis, key: str, unit_id: str) -> None:
    """Called by whatever finishes a unit (the worker's hook, the last task, the workflow)."""
    client.rpush(key, f"{unit_id} {time.time():.6f}")


@dataclass(frozen=True)
class PgMark:
    """Cluster-wide write-transaction counter and WAL position at one moment."""

    txid: int
    lsn: int


class PgProbe:
    """Reads txid_current() and pg_current_wal_lsn() on its own autocommit connection.

    pg_stat_database's xact_commit lags by seconds on PostgreSQL 15, so write transactions
    are counted by the txid delta: only transactions that write get a transaction id. The
    probe's own txid_current() takes one id per mark, which `between` subtracts.
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(pg_dsn(url), autocommit=True)

    def mark(self) -> PgMark:
        row = self.conn.execute("SELECT txid_current(), pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        high, low = str(row[1]).split("/")
        return PgMark(int(row[0]), (int(high, 16) << 32) + int(low, 16))

    @staticmethod
    def between(before: PgMark, after: PgMark) -> tuple[int, int]:
        """(write transactions, WAL bytes) between two marks, the probe's own excluded."""
        return after.txid - before.txid - 1, after.lsn - before.lsn

    def close(self) -> None:
        self.conn.close()


class DoneList:
    """The Redis list a system under test pushes finished units onto."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    def reset(self) -> None:
        self.client.delete(self.key)

    def wait_all(self, count: int, timeout: float) -> dict[str, float]:
        """{unit id: finish time} once `count` units finished; polls Redis, not PostgreSQL."""
        deadline = time.monotonic() + timeout
        while self.client.llen(self.key) < count:
            if time.monotonic() > deadline:
                got = self.client.llen(self.key)
                raise TimeoutError(f"{got}/{count} units finished within {timeout:.0f}s")
            time.sleep(0.02)
        return dict(_parse(item) for item in self.client.lrange(self.key, 0, -1))

    def wait_one(self, timeout: float) -> tuple[str, float]:
        item = self.client.blpop([self.key], timeout=timeout)
        if item is None:
            raise TimeoutError(f"no unit finished within {timeout:.0f}s")
        return _parse(item[1])


def _parse(raw: bytes | str) -> tuple[str, float]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    unit_id, finished = text.rsplit(" ", 1)
    return unit_id, float(finished)


class CpuMeter:
    """CPU seconds used by each group of processes, read from /proc (Linux).

    Groups: "system" (the processes of the system under test, by process group), "driver"
    (the process that sends), "postgres" (every child of our postmaster), "redis" (our
    server), and "machine" (all CPUs busy, from /proc/stat: includes other people's work on
    a shared machine) with "steal" (time the hypervisor gave to other guests).
    """

    def __init__(self, system_pgids: set[int], driver_pid: int | None = None) -> None:
        self.system_pgids = system_pgids
        self.driver_pid = driver_pid if driver_pid is not None else os.getpid()
        self.postmaster = _pid_from_file(os.environ.get("BENCH_PG_DATA"), "postmaster.pid")
        self.redis_pid = int(os.environ.get("BENCH_REDIS_PID") or 0) or None
        self.tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> dict[str, float]:
        totals = {"system": 0.0, "driver": 0.0, "postgres": 0.0, "redis": 0.0}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            ppid, pgrp = int(fields[1]), int(fields[2])
            used = (int(fields[11]) + int(fields[12])) / self.tick
            if pgrp in self.system_pgids and pid != self.driver_pid:
                totals["system"] += used
            elif pid == self.driver_pid:
                totals["driver"] += used
            elif self.postmaster and (pid == self.postmaster or ppid == self.postmaster):
                totals["postgres"] += used
            elif pid == self.redis_pid:
                totals["redis"] += used
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice
        totals["machine"] = (cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]) / self.tick
        totals["steal"] = cpu[7] / self.tick
        return totals

    @staticmethod
    def per_unit_ms(
        before: dict[str, float], after: dict[str, float], units: int, seconds: float
    ) -> dict[str, float]:
        """CPU milliseconds per unit by group, and what the rest of the machine used."""
        delta = {k: after[k] - before[k] for k in before}
        ours = delta["system"] + delta["driver"] + delta["postgres"] + delta["redis"]
        out = {k: 1000 * delta[k] / units for k in ("system", "driver", "postgres", "redis")}
        out["others_cores"] = max(0.0, delta["machine"] - ours) / seconds
        out["steal_cores"] = delta["steal"] / seconds
        return out


def _pid_from_file(folder: str | None, name: str) -> int | None:
    if not folder:
        return None
    try:
        first = Path(folder, name).read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


@dataclass
class BurstResult:
    """One burst: N units sent at once, from the first send to the last finish."""

    n: int
    seconds: float
    throughput: float
    send_seconds: float
    write_txns_per_unit: float
    wal_bytes_per_unit: float
    window: tuple[float, float]
    cpu_ms_per_unit: dict[str, float] = field(default_factory=dict)


@dataclass
class SerialResult:
    """Units sent one at a time, each after the previous finished (one in flight)."""

    n: int
    latencies_ms: list[float] = field(repr=False)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)


def run_burst(
    send: Callable[[str], Any],
    ids: Sequence[str],
    done: DoneList,
    probe: PgProbe,
    timeout: float,
    cpu: CpuMeter | None = None,
) -> BurstResult:
    """Send every unit at once, wait for all, count database writes over the window."""
    done.reset()
    cpu_before = cpu.snapshot() if cpu else None
    before = probe.mark()
    started = time.time()
    for unit_id in ids:
        send(unit_id)
    sent = time.time()
    finished = done.wait_all(len(ids), timeout)
    cpu_after = cpu.snapshot() if cpu else None
    cpu_seconds = time.time() - started
    time.sleep(SETTLE_SECONDS)
    txns, wal = probe.between(before, probe.mark())
    missing = set(ids) - set(finished)
    if missing:
        raise RuntimeError(f"{len(missing)} unexpected or missing unit ids, e.g. {min(missing)}")
    last = max(finished.values())
    seconds = last - started
    return BurstResult(
        n=len(ids),
        seconds=seconds,
        throughput=len(ids) / seconds,
        send_seconds=sent - started,
        write_txns_per_unit=txns / len(ids),
        wal_bytes_per_unit=wal / len(ids),
        window=(started, last),
        cpu_ms_per_unit=(
            CpuMeter.per_unit_ms(cpu_before, cpu_after, len(ids), cpu_seconds)
            if cpu_before and cpu_after
            else {}
        ),
    )


def run_serial(
    send: Callable[[str], Any], ids: Sequence[str], done: DoneList, timeout: float
) -> SerialResult:
    """End-to-end latency with one unit in flight: send, wait for its finish, repeat."""
    done.reset()
    latencies: list[float] = []
    started = time.time()
    for unit_id in ids:
        sent = time.time()
        send(unit_id)
        got, finished = done.wait_one(timeout)
        if got != unit_id:
            raise RuntimeError(f"expected {unit_id} to finish, got {got}")
        latencies.append((finished - sent) * 1000)
    return SerialResult(
        n=len(ids),
        latencies_ms=latencies,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_ms=statistics.fmean(latencies),
        window=(started, time.time()),
    )


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def as_json(value: Any) -> Any:
    """Dataclasses to plain dicts, dropping per-sample lists (kept out of the summary)."""
    data = asdict(value)
    data.pop("latencies_ms", None)
    return data


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def package_shim(checkout: Path, folder: Path) -> Path:
    """A folder to put first on PYTHONPATH so that `checkout`'s saga_worker is imported.

    Its saga_worker is a real folder of links to the checkout's modules plus `migrations`
    (installed as saga_worker.migrations): linking the package alone would take the
    migrations of the installed (editable) project, whose finder maps that name.
    """
    package = folder / "saga_worker"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (checkout / "saga_worker").iterdir():
        link = package / entry.name
        if not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    if not (package / "migrations").exists():
        (package / "migrations").symlink_to(checkout / "migrations", target_is_directory=True)
    return folder


def servers_from_env() -> tuple[str, str] | None:
    """(admin PostgreSQL URL, Redis URL) that bench/run.sh exports, or None (said why)."""
    admin_url = os.environ.get("BENCH_DATABASE_URL")
    redis_url = os.environ.get("BENCH_REDIS_URL")
    if not admin_url or not redis_url:
        print("BENCH_DATABASE_URL and BENCH_REDIS_URL must be set (bench/run.sh sets them)")
        return None
    return admin_url, redis_url
