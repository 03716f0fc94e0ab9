"""What one saga writes to PostgreSQL's WAL, by relation and record type, per checkout.

    bash bench/run.sh wal base=/tmp/wt-a new=/tmp/wt-b [--sagas 1000]

Each NAME=PATH is a checkout of this repository. For each, a child process (PYTHONPATH
puts the checkout's saga_worker first) creates and migrates a fresh database, runs the
benchmark saga (three local steps, bench/sagas.py's shape) through the real engine and the
real PostgreSQL store, in-process and one at a time (`SagaTestHarness` with its store
swapped for `SagaStore`), and reports the WAL written between two positions, from
`pg_waldump --stats` over that range: in all, per relation (table, TOAST, each index) and
per record type, with full-page images counted apart. There is no broker and no timing
noise: the figures are what the write path writes, so each change can be measured alone.

Warm-up sagas run first, then a CHECKPOINT: pages touched for the first time after it
are written whole once (full-page images), as after every checkpoint in production. The
report gives the bytes with and without them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from .common import package_shim, pg_dsn, write_json
from .main import RESULTS, log

CHILD = r"""
import json, sys, time
from saga_worker import SagaDefinition, Step
from saga_worker.audit.redaction import Redactor
from saga_worker.engine import SagaEngine
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from saga_worker.testing import SagaTestHarness
import psycopg

url, dsn, warmup, sagas = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
definition = SagaDefinition(
    "bench_saga",
    [
        Step("reserve", lambda c: {"a": int(c.context["n"]) + 1}),
        Step("compute", lambda c: {"b": int(c.context["a"]) * 2}),
        Step("record", lambda c: {"c": int(c.context["b"]) + 3}),
    ],
)
engine = create_db_engine(url)
upgrade(engine)
h = SagaTestHarness(definition)
h.store = SagaStore(engine, Redactor([]))
h.engine = SagaEngine(h.store, h.dispatcher, h.limits, clock=h.clock, definitions=h._definition)
probe = psycopg.connect(dsn, autocommit=True)

def lsn():
    return probe.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]

def run(count):
    # The clock moves between transitions as it does in a worker: each attempt gets its own
    # deadline and updated_at, which decides whether an update can be HOT.
    for i in range(count):
        h.start({"n": i})
        while h.queued:
            h.advance_clock(0.004)
            h.run_next()
        assert h.saga.state.value == "COMPLETED", h.saga.state

run(warmup)
probe.execute("CHECKPOINT")
start = lsn()
began = time.perf_counter()
run(sagas)
seconds = time.perf_counter() - began
end = lsn()
rels = dict(
    probe.execute(
        "SELECT pg_relation_filenode(c.oid)::text, c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname IN ('public', 'pg_toast') AND pg_relation_filenode(c.oid) IS NOT NULL"
    ).fetchall()
)
toast = dict(
    probe.execute(
        "SELECT pg_relation_filenode(reltoastrelid)::text, relname || ' (TOAST)' FROM pg_class "
        "WHERE relname LIKE 'saga_%' AND reltoastrelid <> 0"
    ).fetchall()
)
rels.update(toast)
probe.execute("SELECT pg_stat_force_next_flush()")
time.sleep(0.6)
upd, hot = probe.execute(
    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'saga_checkpoints'"
).fetchone()
db_oid = probe.execute(
    "SELECT oid FROM pg_database WHERE datname = current_database()"
).fetchone()[0]
print(json.dumps({"start": start, "end": end, "seconds": seconds, "relations": rels,
                  "db_oid": db_oid, "hot_ratio": hot / upd if upd else None}))
"""

_RECORD = re.compile(r"rel (\d+)/(\d+)/(\d+)")
_LEN = re.compile(r"len \(rec/tot\):\s*(\d+)/\s*(\d+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--label", default="wal")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    admin_url = os.environ["BENCH_DATABASE_URL"]
    waldump = Path(os.environ["PG_BIN"]) / "pg_waldump"
    wal_dir = Path(os.environ["BENCH_PG_DATA"]) / "pg_wal"
    report: dict[str, Any] = {"sagas": args.sagas, "warmup": args.warmup, "variants": {}}
    for name, path in (v.split("=", 1) for v in args.variants):
        log(f"wal: {name} ({path})")
        report["variants"][name] = measure(admin_url, Path(path), args, waldump, wal_dir)
    write_json(Path(args.results) / f"{args.label}.json", report)
    print_table(report)
    return 0


def measure(
    admin_url: str, checkout: Path, args: argparse.Namespace, waldump: Path, wal_dir: Path
) -> dict[str, Any]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS bench_wal"))
        conn.execute(text("CREATE DATABASE bench_wal"))
    admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + "/bench_wal"
    with tempfile.TemporaryDirectory() as shim:
        package_shim(checkout, Path(shim))
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, url, pg_dsn(url), str(args.warmup), str(args.sagas)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": shim},
            cwd=shim,  # -c puts the working directory first on sys.path
        )
    if proc.returncode != 0:
        raise RuntimeError(f"the saga run failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    child = json.loads(out.strip().splitlines()[-1])
    dump = subprocess.run(
        [str(waldump), "-p", str(wal_dir), "-s", child["start"], "-e", child["end"]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    by_relation: dict[str, dict[str, int]] = {}
    by_type: dict[str, int] = {}
    total = fpi = 0
    for line in dump.splitlines():
        found = _LEN.search(line)
        if not found:
            continue
        rec, tot = int(found.group(1)), int(found.group(2))
        rmgr = line.split("rmgr:", 1)[1].split()[0]
        desc = line.split("desc:", 1)[1].split()[0] if "desc:" in line else "?"
        kind = f"{rmgr} {desc}"
        rel = _RECORD.search(line)
        name = child["relations"].get(rel.group(3), rel.group(3)) if rel else "(none)"
        if rel and int(rel.group(2)) != child["db_oid"]:
            name = "(other database)"
        entry = by_relation.setdefault(name, {"records": 0, "bytes": 0, "fpi_bytes": 0})
        entry["records"] += 1
        entry["bytes"] += tot
        entry["fpi_bytes"] += tot - rec
        by_type[kind] = by_type.get(kind, 0) + tot
        total += tot
        fpi += tot - rec
    n = args.sagas
    return {
        "wal_bytes_per_saga": total / n,
        "wal_bytes_per_saga_without_fpi": (total - fpi) / n,
        "records_per_saga": sum(e["records"] for e in by_relation.values()) / n,
        "checkpoint_hot_update_ratio": child["hot_ratio"],
        "serial_seconds_per_saga": child["seconds"] / n,
        "by_relation": {
            k: {kk: vv / n for kk, vv in v.items()}
            for k, v in sorted(by_relation.items(), key=lambda kv: -kv[1]["bytes"])
        },
        "by_record_type": {k: v / n for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
    }


def print_table(report: dict[str, Any]) -> None:
    names = list(report["variants"])
    print(f"\nWAL per saga ({report['sagas']} sagas, bytes; FPI = full-page images)")
    print(f"{'':44s}" + "".join(f"{n:>14s}" for n in names))
    rows = [
        ("total", "wal_bytes_per_saga", 1.0),
        ("total without FPI", "wal_bytes_per_saga_without_fpi", 1.0),
        ("records", "records_per_saga", 1.0),
        ("checkpoint updates HOT (%, whole run)", "checkpoint_hot_update_ratio", 100.0),
        ("in-process ms per saga (serial)", "serial_seconds_per_saga", 1000.0),
    ]
    for label, key, scale in rows:
        cells = [report["variants"][n][key] * scale for n in names]
        print(f"{label:44s}" + "".join(f"{c:14.1f}" for c in cells))
    relations: list[str] = []
    for n in names:
        relations += [r for r in report["variants"][n]["by_relation"] if r not in relations]
    for rel in relations:
        cells = []
        for n in names:
            e = report["variants"][n]["by_relation"].get(rel)
            cells.append(f"{e['bytes']:14.1f}" if e else f"{'-':>14s}")
        print(f"  {rel[:42]:42s}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
