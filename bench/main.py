"""The benchmark driver: every system, repeated, then the scale test, the table and the chart.

Run through ``bash bench/run.sh`` (which starts the servers); ``--help`` lists the sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from saga_worker.store.connect import create_db_engine

from .common import servers_from_env, write_json
from .systems import REPO, SYSTEMS, Context, Plan

RESULTS = REPO / "bench" / "results"

#: (metric path, label, unit, higher is better) of the summary table.
METRICS = (
    (("burst", "throughput"), "burst throughput", "units/s", True),
    (("serial", "p50_ms"), "serial p50", "ms", False),
    (("serial", "p99_ms"), "serial p99", "ms", False),
    (("burst", "write_txns_per_unit"), "write txns/unit", "", False),
    (("burst", "wal_bytes_per_unit"), "WAL bytes/unit", "B", False),
    (("commit_burst", "p50_ms"), "commit p50 (burst)", "ms", False),
    (("commit_burst", "p99_ms"), "commit p99 (burst)", "ms", False),
    (("commit_serial", "p50_ms"), "commit p50 (serial)", "ms", False),
    (("serial_with_outcome_p50_ms",), "serial p50 incl. outcome", "ms", False),
    (("burst", "cpu_ms_per_unit", "system"), "CPU/unit: system", "ms", False),
    (("burst", "cpu_ms_per_unit", "postgres"), "CPU/unit: PostgreSQL", "ms", False),
    (("burst", "cpu_ms_per_unit", "redis"), "CPU/unit: Redis", "ms", False),
    (("burst", "cpu_ms_per_unit", "driver"), "CPU/unit: producer", "ms", False),
    (("burst", "cpu_ms_per_unit", "others_cores"), "others' load (cores)", "", False),
)


def main() -> int:
    args = parse_args()
    servers = servers_from_env()
    if servers is None:
        return 2
    admin_url, redis_url = servers
    work_dir = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    ctx = Context(admin_url, redis_url, work_dir, Path(args.saga_src) if args.saga_src else None)
    plan = Plan(args.n, args.serial, args.warmup)
    began = time.monotonic()
    log(f"work dir {work_dir}; N={plan.n}, serial={plan.serial}, reps={args.reps}")
    prepare_databases(ctx)
    started_meta = meta(args, ctx)  # before the runs: the load average at the start

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.systems}
    for rep in range(args.reps):
        # Rotate the order so that drift in the machine's load does not favour one system.
        shift = rep % len(args.systems)
        for name in args.systems[shift:] + args.systems[:shift]:
            runs[name].append(run_one(ctx, name, plan, rep))

    report: dict[str, Any] = {
        "meta": started_meta,
        "plan": {"n": plan.n, "serial": plan.serial, "warmup": plan.warmup, "reps": args.reps},
        "runs": runs,
        "summary": {name: summarize(rs) for name, rs in runs.items()},
    }
    report["ratios"] = ratios(report["summary"])
    if args.profile:
        from .profile import profile_saga_worker

        report["profile"] = profile_saga_worker(ctx, plan)
    if args.scale_sagas > 0:
        from .scale import run_scale

        log("scale test: generating rows with SQL")
        report["scale"] = run_scale(
            admin_url, args.scale_sagas, args.scale_stalled, args.scale_audit
        )
    report["meta"]["total_seconds"] = time.monotonic() - began
    report["meta"]["loadavg_end"] = os.getloadavg()

    results = Path(args.results)
    write_json(results / f"{args.label}.json", report)
    print_report(report)
    try:
        from .chart import draw

        draw(report, results / f"{args.label}.png")
        log(f"wrote {results / (args.label + '.json')} and .png")
    except ImportError as exc:
        log(f"no chart ({exc}); wrote {results / (args.label + '.json')}")
    if not args.keep_logs:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1500, help="units per burst")
    parser.add_argument("--serial", type=int, default=150, help="units of the serial series")
    parser.add_argument("--warmup", type=int, default=50, help="units before each burst")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), metavar="SYSTEM"
    )
    parser.add_argument("--scale-sagas", type=int, default=1_000_000, help="0 skips the scale test")
    parser.add_argument("--scale-stalled", type=int, default=100)
    parser.add_argument("--scale-audit", type=int, default=10_000_000)
    parser.add_argument("--profile", action="store_true", help="py-spy one saga_worker burst")
    parser.add_argument("--saga-src", help="benchmark saga_worker from this checkout instead")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--label", default="results", help="file name of the JSON and PNG")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--note", default="", help="free text kept in the JSON (conditions)")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_databases(ctx: Context) -> None:
    admin = create_db_engine(ctx.admin_url, pool=False).execution_options(
        isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        for name in ("bench_saga", "bench_dbos"):
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    # Migrate with the saga_worker under test (the installed one or --saga-src).
    # create_db_engine moved to store.connect after 0.2.0; older checkouts are A/B'd too.
    code = (
        "import sys\n"
        "from saga_worker.store.migrate import upgrade\n"
        "try:\n"
        "    from saga_worker.store.connect import create_db_engine\n"
        "except ImportError:\n"
        "    from saga_worker.store.repository import create_db_engine\n"
        "upgrade(create_db_engine(sys.argv[1], pool=False))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, ctx.db_url("bench_saga")],
        check=True,
        env={**os.environ, "PYTHONPATH": ctx.pythonpath()},
        cwd=ctx.work_dir,
    )


def run_one(ctx: Context, name: str, plan: Plan, rep: int) -> dict[str, Any]:
    system = SYSTEMS[name](ctx)
    load = os.getloadavg()[0]
    started = time.monotonic()
    system.start()
    try:
        result = system.measure(plan, f"{name}-r{rep}")
    finally:
        system.stop()
    result["rep"] = rep
    result["loadavg_1m_before"] = load
    burst, serial = result["burst"], result["serial"]
    log(
        f"{name:13s} rep {rep}: {burst['throughput']:7.1f}/s  serial p50 "
        f"{serial['p50_ms']:6.2f} ms p99 {serial['p99_ms']:6.2f} ms  "
        f"{burst['write_txns_per_unit']:.2f} txn/unit  {burst['wal_bytes_per_unit']:.0f} B WAL/unit"
        f"  (load {load:.1f}, {time.monotonic() - started:.0f}s)"
    )
    return result


def _get(run: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = run
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min-max over the repetitions of every metric of the table."""
    out: dict[str, Any] = {}
    for path, _label, _unit, _higher in METRICS:
        values = [v for v in (_get(r, path) for r in runs) if v is not None and v == v]
        if values:
            out[".".join(path)] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "values": values,
            }
    return out


def _median(summary: dict[str, Any], system: str, metric: str) -> float | None:
    entry = summary.get(system, {}).get(metric)
    return None if entry is None else float(entry["median"])


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """saga_worker over the ceiling and over DBOS, with the targets of issue 18."""
    thr, p50 = "burst.throughput", "serial.p50_ms"
    saga_thr, saga_p50 = _median(summary, "saga_worker", thr), _median(summary, "saga_worker", p50)
    dbos_modes = [m for m in ("dbos_start", "dbos_queue") if m in summary]
    best_dbos = max(dbos_modes, key=lambda m: _median(summary, m, thr) or 0, default=None)
    out: dict[str, Any] = {"best_dbos_mode_by_throughput": best_dbos}

    def add(name: str, num: float | None, den: float | None, target: str, ok: Any) -> None:
        if num is None or den is None or den == 0:
            return
        value = num / den
        out[name] = {"value": value, "target": target, "met": bool(ok(value))}

    chain_thr = _median(summary, "celery_chain", thr)
    add("throughput_vs_ceiling", saga_thr, chain_thr, ">= 0.55", lambda v: v >= 0.55)
    if best_dbos:
        best_thr = _median(summary, best_dbos, thr)
        add("throughput_vs_best_dbos", saga_thr, best_thr, ">= 1.25", lambda v: v >= 1.25)
    add(
        "serial_p50_vs_ceiling",
        saga_p50,
        _median(summary, "celery_chain", p50),
        "<= 1.6",
        lambda v: v <= 1.6,
    )
    add(
        "serial_p50_vs_dbos_start",
        saga_p50,
        _median(summary, "dbos_start", p50),
        "<= 0.9",
        lambda v: v <= 0.9,
    )
    txns = _median(summary, "saga_worker", "burst.write_txns_per_unit")
    if txns is not None:
        out["saga_write_txns_per_saga"] = {
            "value": txns,
            "target": "<= 4 (start + 3 steps)",
            "met": txns <= 4.05,
        }
    wal = _median(summary, "saga_worker", "burst.wal_bytes_per_unit")
    if wal is not None:
        out["saga_wal_bytes_per_saga"] = {"value": wal, "target": "<= 6000", "met": wal <= 6000}
    commit = _median(summary, "saga_worker", "commit_burst.p99_ms")
    if commit is not None:
        out["saga_commit_p99_burst_ms"] = {"value": commit, "target": "<= 5", "met": commit <= 5}
    return out


def meta(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        src = ctx.saga_src or REPO
        try:
            return subprocess.run(
                ["git", "-C", str(src), *cmd], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    versions = {}
    for package in ("celery", "kombu", "redis", "sqlalchemy", "psycopg", "dbos"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "?"
    engine = create_db_engine(ctx.admin_url, pool=False)
    with engine.connect() as conn:
        pg = {
            s: str(conn.execute(text(f"SHOW {s}")).scalar())
            for s in ("server_version", "fsync", "synchronous_commit", "shared_buffers")
        }
    engine.dispose()
    dirty = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "saga_worker_commit": git("rev-parse", "--short", "HEAD"),
        "saga_worker_uncommitted_files": len(dirty),
        "saga_worker_source": str(ctx.saga_src or REPO),
        "versions": versions,
        "postgresql": pg,
        "note": args.note,
    }


def print_report(report: dict[str, Any]) -> None:
    summary = report["summary"]
    systems = list(summary)
    width = 22
    print()
    print(f"{'metric (median [min-max])':30s}" + "".join(f"{s:>{width}s}" for s in systems))
    for path, label, unit, _higher in METRICS:
        key = ".".join(path)
        cells = []
        for system in systems:
            entry = summary[system].get(key)
            if entry is None:
                cells.append(f"{'-':>{width}s}")
                continue
            digits = 0 if entry["median"] >= 100 else 2
            lo, mid, hi = entry["min"], entry["median"], entry["max"]
            cell = f"{mid:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"
            cells.append(f"{cell:>{width}s}")
        print(f"{(label + (' ' + unit if unit else '')):30s}" + "".join(cells))
    print()
    for name, entry in report["ratios"].items():
        if isinstance(entry, dict):
            mark = "met" if entry["met"] else "NOT met"
            print(f"  {name:32s} {entry['value']:8.2f}   target {entry['target']:24s} {mark}")
        else:
            print(f"  {name:32s} {entry}")
    scale = report.get("scale")
    if scale:
        scan, show = scale["recovery_scan"], scale["audit_show"]
        print(
            f"\n  scale: recovery scan over {scale['sagas_terminal']:,} terminal + "
            f"{scale['sagas_stalled']} stalled: p50 {scan['p50_ms']:.2f} ms, "
            f"max {scan['max_ms']:.2f} ms, first {scan['first_ms']:.2f} ms (target < 50 ms)"
        )
        print(
            f"  scale: audit_trail of one saga among {scale['audit_rows']:,} audit rows: "
            f"first read p50 {show['first_read_p50_ms']:.2f} ms, max "
            f"{show['first_read_max_ms']:.2f} ms; repeat p50 {show['repeat_p50_ms']:.2f} ms "
            "(target < 20 ms)"
        )
    m = report["meta"]
    print(
        f"\n  {m['cpus']} CPUs, load average at start {m['loadavg_start'][0]:.1f}, at end "
        f"{m['loadavg_end'][0]:.1f}; total {m['total_seconds']:.0f}s"
    )


if __name__ == "__main__":
    sys.exit(main())
