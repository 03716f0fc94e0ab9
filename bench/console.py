"""The console at size: its pages timed server-side against 1M sagas and 10M audit rows.

Generates the tables as the scale test does (bench/scale.py's loaders, SQL only, indexes
rebuilt, VACUUM ANALYZE) into database ``bench_console``, with what the console's pages
need on top: several saga types, a business key on each saga ('ORD-<n>'), a few hundred
FAILED, parked, waiting, compensating and stalled sagas, and an outcome row in the last hour
for the latest sagas. Each saga has its audit rows spread over the table (row g belongs to
saga g mod sagas), the unfavourable layout for a timeline.

Then it runs the console's Starlette app in-process (``create_app`` with a SagaClient on
that database and a users file with one operator), logs in, and requests each page kind many
times, in a shuffled order, after a warm-up. Each request is timed inside the app (an ASGI
middleware around it, from the request's arrival to the last byte of its response), with the
time of its SQL statements beside it. A benchmark: it reports, it does not pass or fail.

    bash bench/run.sh console                                     # 1M sagas, 10M audit rows
    bash bench/run.sh console --scale-sagas 10000 --scale-audit 100000 --requests 50  # smoke

Results: bench/results/<label>.json (p50/p95/max per page kind; the p50/p95 of each SQL
statement; EXPLAIN (ANALYZE, BUFFERS) of the statements of any page over --target-ms at
p95, of any statement over 20 ms at p95 and of the two slowest of every page) and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, event, text

from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.tables import checkpoints

from .common import write_json
from .scale import LIVE_NOT_DUE, PENDING, _iso, _sizes, fresh_database, load

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATABASE = "bench_console"
#: A fixed key, so that a kept database (--reuse) accepts the next run's console.
SIGNING_KEY = "bench-console-signing-key-not-a-secret-0123456789"
USER, PASSWORD = "bench-operator", "bench-operator-password"

#: Saga types, weighted: the sagas' type is TYPES[(g + g / 4000) % len(TYPES)], so the few
#: FAILED, parked and waiting sagas (one residue mod 4000 each) spread over every type.
TYPES = (
    *["order_checkout"] * 10,
    *["payment_refund"] * 5,
    *["shipment"] * 3,
    "inventory_sync",
    "account_onboarding",
)
FAILED_ERROR = (
    "compensation of reserve failed: PaymentGatewayTimeout: upstream timed out after 30 s "
    "(attempt 5/5)"
)
#: Page kinds, in the order of the table.
KINDS = (
    "overview",
    "search_all",
    "search_key",
    "search_type_state",
    "search_user",
    "search_time",
    "timeline",
    "api_saga",
)
DESCRIPTIONS = {
    "overview": "overview page `/`",
    "search_all": "search, no filter, first page `/sagas`",
    "search_key": "search by business key `/sagas?key=ORD-n` (random saga)",
    "search_type_state": "search by type and state, first page (random cell of the overview)",
    "search_user": "search by user `/sagas?user=user_n` (1 saga in 1,000 each)",
    "search_time": "search by a one-hour time range `/sagas?since=&until=` (random hour)",
    "timeline": "one saga's timeline `/sagas/{id}` (random saga, ~10 audit rows)",
    "api_saga": "JSON API `/api/sagas/{id}` (random saga)",
}


# -- the data --------------------------------------------------------------------------------


def _array(values: tuple[str, ...] | list[str]) -> str:
    return "ARRAY[" + ",".join(f"'{v}'" for v in values) + "]"


def console_columns(with_key: bool) -> dict[str, str]:
    """Overrides of the scale test's 'scale-<g>' checkpoints (SQL over g): types, states,
    business keys and the sagas that need someone. Residues of g mod 4000: 1 FAILED,
    2 parked, 3 waiting for a signal, 4 COMPENSATING; g mod 1000 = 7 ABORTED; every 50th
    COMPENSATED; the rest COMPLETED."""
    r = "(g % 4000)"
    live = f"{r} IN (1, 2, 3, 4)"
    started = "now() - make_interval(secs => g)"
    pending = {
        2: PENDING.format(iso=_iso(started), iso_deadline=_iso(f"{started} + interval '5 min'")),
        3: PENDING.format(iso=_iso(started), iso_deadline=_iso("now() + interval '1 day'")),
        4: PENDING.format(iso=_iso("now()"), iso_deadline=_iso("now() + interval '1 hour'")),
    }
    columns = {
        "saga_type": f"({_array(TYPES)})[(g + g / 4000) % {len(TYPES)} + 1]",
        "state": f"""CASE WHEN {r} = 1 THEN 'FAILED' WHEN {r} IN (2, 3) THEN 'RUNNING'
            WHEN {r} = 4 THEN 'COMPENSATING' WHEN g % 1000 = 7 THEN 'ABORTED'
            WHEN g % 50 = 0 THEN 'COMPENSATED' ELSE 'COMPLETED' END""",
        "current_step_index": f"CASE WHEN {live} THEN 1 ELSE 3 END",
        "completed_steps": f"""CASE WHEN {live} THEN '["reserve"]'::json
            ELSE '["reserve","compute","record"]'::json END""",
        "error": f"""CASE WHEN {r} = 1 THEN '{FAILED_ERROR}'
            WHEN g % 1000 = 7 THEN 'aborted by an operator' END""",
        "failed_compensations": f"""CASE WHEN {r} = 1 THEN '["reserve"]'::json
            ELSE '[]'::json END""",
        "pending": f"CASE {r} "
        + " ".join(f"WHEN {k} THEN {v}" for k, v in pending.items())
        + " END",
        "deadline": f"""CASE {r} WHEN 3 THEN now() + interval '1 day'
            WHEN 4 THEN now() + interval '1 hour' END""",
        "parked_at": f"CASE WHEN {r} = 2 THEN {started} + interval '10 s' END",
        "definition_version": f"CASE WHEN {r} = 2 THEN 'v0' ELSE 'v1' END",
        "waiting_for": f"CASE WHEN {r} = 3 THEN 'signal:payment_confirmed' END",
        "waiting_since": f"CASE WHEN {r} = 3 THEN {started} + interval '2 s' END",
    }
    if with_key:
        columns["business_key"] = "'ORD-' || g"
    return columns


def live_columns(with_key: bool) -> dict[str, str]:
    """Overrides of the stalled and not-yet-due sagas: a console type and their own keys."""
    columns = {"saga_type": "'order_checkout'", "definition_version": "'v1'"}
    if with_key:
        columns["business_key"] = "'ORD-L' || g"
    return columns


def recent_outcomes(minutes: int = 60) -> str:
    """An outcome row for each of the sagas that started in the last `minutes` (the latest,
    'scale-1'...), chained to the saga's last generated row: the overview's last hour."""
    event_of_state = (
        "CASE WHEN g % 4000 = 1 THEN 'saga_failed' WHEN g % 1000 = 7 THEN 'saga_aborted' "
        "WHEN g % 50 = 0 THEN 'saga_compensated' ELSE 'saga_complete' END"
    )
    last = "(g + :sagas * ((:rows - 1 - g) / :sagas))"  # the saga's last generated row
    return f"""
        INSERT INTO saga_audit_logs (
            saga_id, event_type, step_name, step_index, event_data, context_snapshot,
            error_message, error_stack_trace, timestamp, duration_ms, user_id, ip_address,
            saga_state_before, saga_state_after, retry_count, prev_hash, hash)
        SELECT 'scale-' || g, {event_of_state}, NULL, NULL, '{{}}'::json, NULL, NULL, NULL,
            now() - make_interval(secs => g) + interval '1 s', NULL, 'user_' || (g % 1000),
            '10.0.0.1', 'RUNNING', 'COMPLETED', 0,
            CASE WHEN g < :rows THEN md5({last}::text) || md5(({last} + 1)::text)
                 ELSE repeat('0', 64) END,
            md5('outcome' || g)  || md5('outcome' || (g + 1))
        FROM generate_series(1, least(:sagas - 1, {minutes * 60})) g
        WHERE g % 4000 NOT IN (2, 3, 4)
        ORDER BY g
    """


def prepare(admin_url: str, sagas: int, stalled: int, audit: int, reuse: bool) -> dict[str, Any]:
    """The database, loaded (or kept from an earlier run with the same sizes: --reuse)."""
    url = admin_url.rsplit("/", 1)[0] + "/" + DATABASE
    with_key = "business_key" in checkpoints.c
    label = f"sagas={sagas} stalled={stalled} audit={audit} key={int(with_key)}"
    if reuse and _database_comment(admin_url) == label:
        log(f"reusing database {DATABASE} ({label}); migrating it to this checkout")
        engine = create_db_engine(url, pool=False)
        began = time.monotonic()
        upgrade(engine)  # a migration of this checkout (an index) applies to the kept rows
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE saga_checkpoints"))
        engine.dispose()
        return {"url": url, "reused": True, "migrate_s": time.monotonic() - began}
    log(f"loading {sagas:,} sagas and {audit:,} audit rows into {DATABASE} ({label})")
    began = time.monotonic()
    url = fresh_database(admin_url, DATABASE)
    engine = create_db_engine(url, pool=False)
    timings = load(
        engine,
        sagas,
        stalled,
        audit,
        checkpoint_columns=console_columns(with_key),
        live_columns=live_columns(with_key),
        audit_extra=[recent_outcomes()],
    )
    timings["total_s"] = time.monotonic() - began
    engine.dispose()
    admin = create_db_engine(admin_url, pool=False).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"COMMENT ON DATABASE {DATABASE} IS '{label}'"))
    admin.dispose()
    log("loaded in " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {"url": url, "reused": False, "setup": timings}


def _database_comment(admin_url: str) -> str | None:
    admin = create_db_engine(admin_url, pool=False)
    with admin.connect() as conn:
        comment = conn.execute(
            text(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname = :name"
            ),
            {"name": DATABASE},
        ).scalar()
    admin.dispose()
    return None if comment is None else str(comment)


def describe(engine: Engine) -> dict[str, Any]:
    """Row counts by type and state, and the table sizes."""
    with engine.connect() as conn:
        cells = conn.execute(
            text(
                "SELECT saga_type, state, count(*) FROM saga_checkpoints "
                "GROUP BY 1, 2 ORDER BY 1, 2"
            )
        ).all()
        special = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE parked_at IS NOT NULL), "
                "count(*) FILTER (WHERE waiting_for IS NOT NULL), "
                "count(*) FILTER (WHERE deadline < now()) FROM saga_checkpoints"
            )
        ).one()
        audit = conn.execute(text("SELECT max(id) FROM saga_audit_logs")).scalar()
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for saga_type, state, n in cells:
        counts[str(saga_type)][str(state)] = int(n)
    return {
        "by_type_state": dict(counts),
        "parked": int(special[0]),
        "waiting": int(special[1]),
        "stalled": int(special[2]),
        "audit_rows": int(audit or 0),
        "sizes": _sizes(engine),
    }


# -- the requests ----------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Timed:
    """ASGI middleware: how long the app took, from the request to its response's last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last_ms: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.last_ms = (time.perf_counter() - began) * 1000

        await self.app(scope, receive, timed_send)


@dataclass
class Statements:
    """The SQL statements run while a request was served, with their durations."""

    current: list[tuple[str, Any, float]] = field(default_factory=list)

    def attach(self, engine: Engine) -> None:
        starts: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
            starts[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
            began = starts.pop(id(cursor), None)
            if began is not None:
                self.current.append((statement, params, (time.perf_counter() - began) * 1000))

    def take(self) -> list[tuple[str, Any, float]]:
        taken, self.current = self.current, []
        return taken


def make_requests(rng: random.Random, kind: str, env: dict[str, Any]) -> str:
    """The path of one request of `kind`, with random arguments."""
    sagas: int = env["sagas"]
    if kind == "overview":
        return "/"
    if kind == "search_all":
        return "/sagas"
    if kind == "search_key":
        return f"/sagas?key=ORD-{rng.randrange(sagas)}"
    if kind == "search_type_state":
        saga_type, state = rng.choice(env["cells"])
        return f"/sagas?type={quote(saga_type)}&state={state}"
    if kind == "search_user":
        return f"/sagas?user=user_{rng.randrange(1000)}"
    if kind == "search_time":
        since = env["now"] - timedelta(seconds=rng.randrange(3600, max(3601, sagas)))
        until = since + timedelta(hours=1)
        return f"/sagas?since={quote(since.isoformat())}&until={quote(until.isoformat())}"
    if kind in ("timeline", "api_saga"):
        prefix = "/api/sagas/" if kind == "api_saga" else "/sagas/"
        return f"{prefix}scale-{rng.randrange(sagas)}"
    raise ValueError(kind)


def measure(url: str, args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    import warnings

    # Starlette's TestClient runs on httpx and says it prefers httpx2: the same client here.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

    from saga_worker.client import SagaClient
    from saga_worker.config import Settings
    from saga_worker.web.app import create_app
    from saga_worker.web.settings import WebSettings
    from saga_worker.web.users import UsersFile

    home = Path(tempfile.mkdtemp(prefix="saga-bench-console-"))
    users = home / "web-users.json"
    UsersFile(users).add(USER, "operator", PASSWORD)
    settings = Settings(
        database_url=url,
        broker_url=os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0",
        home=home,
        signing_key=SIGNING_KEY,
    )
    client = SagaClient(settings)
    statements = Statements()
    statements.attach(client.store.engine)
    timed = Timed(create_app(client, WebSettings(users_file=users)))
    kinds = [k for k in args.kinds if k != "search_key" or "business_key" in checkpoints.c]
    skipped = sorted(set(args.kinds) - set(kinds))
    if skipped:
        log(f"skipped {skipped}: this checkout has no business_key column")
    env = {
        "sagas": facts["sagas"],
        "now": datetime.now(UTC),
        "cells": [(t, s) for t, states in facts["by_type_state"].items() for s in sorted(states)],
    }
    rng = random.Random(args.seed)
    samples: dict[str, list[float]] = defaultdict(list)
    db_ms: dict[str, list[float]] = defaultdict(list)
    per_statement: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    slowest: dict[tuple[str, str], tuple[float, Any]] = {}
    errors: dict[str, list[str]] = defaultdict(list)
    with TestClient(timed, base_url="http://console.bench") as http:
        _login(http)
        statements.take()
        warmup = [k for k in kinds for _ in range(args.warmup)]
        rng.shuffle(warmup)
        measured = [k for k in kinds for _ in range(args.requests)]
        rng.shuffle(measured)
        log(f"{len(warmup)} warm-up requests, then {len(measured)} measured")
        began = time.monotonic()
        for i, kind in enumerate(warmup + measured):
            path = make_requests(rng, kind, env)
            timed.last_ms = None
            response = http.get(path, follow_redirects=False)
            ran = statements.take()
            if response.status_code != 200:
                errors[kind].append(f"{response.status_code} {path}: {response.text[:200]}")
                continue
            if i < len(warmup):
                continue
            assert timed.last_ms is not None
            samples[kind].append(timed.last_ms)
            db_ms[kind].append(sum(ms for _s, _p, ms in ran))
            for statement, params, ms in ran:
                key = _normalize(statement)
                per_statement[kind][key].append(ms)
                if ms > slowest.get((kind, key), (-1.0, None))[0]:
                    slowest[(kind, key)] = (ms, (statement, params))
            done = i - len(warmup) + 1
            if done % 400 == 0:
                log(f"  {done}/{len(measured)} ({time.monotonic() - began:.0f}s)")
        measured_s = time.monotonic() - began
    client.store.engine.dispose()
    shutil.rmtree(home, ignore_errors=True)
    pages: dict[str, Any] = {}
    for kind in kinds:
        pages[kind] = {
            "what": DESCRIPTIONS[kind],
            **_stats(samples[kind]),
            "db_p50_ms": _pct(db_ms[kind], 50),
            "db_p95_ms": _pct(db_ms[kind], 95),
            "errors": len(errors[kind]),
            "error_examples": errors[kind][:3],
            "statements": [
                {"sql": key, "runs": len(v), **_stats(v)}
                for key, v in sorted(per_statement[kind].items(), key=lambda kv: -_pct(kv[1], 95))
            ],
        }
    plans = _plans(url, pages, slowest, args.target_ms)
    return {"pages": pages, "plans": plans, "measured_s": measured_s, "skipped": skipped}


def _login(http: Any) -> None:
    page = http.get("/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    if found is None:
        raise RuntimeError("no CSRF token on the login page")
    done = http.post(
        "/login",
        data={"csrf": found.group(1), "name": USER, "password": PASSWORD},
        follow_redirects=False,
    )
    if done.status_code != 303:
        raise RuntimeError(f"login refused: {done.status_code} {done.text[:200]}")


def _normalize(statement: str) -> str:
    return " ".join(statement.split())


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 50),
        "p95_ms": _pct(values, 95),
        "max_ms": max(values) if values else float("nan"),
        "mean_ms": statistics.fmean(values) if values else float("nan"),
    }


def _plans(
    url: str,
    pages: dict[str, Any],
    slowest: dict[tuple[str, str], tuple[float, Any]],
    target_ms: float,
) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement of a page over the target at p95, of
    any statement over 20 ms at p95, and of the two slowest statements of every page, each
    with the arguments of its slowest run."""
    wanted: list[tuple[str, str]] = []
    for kind, page in pages.items():
        for rank, s in enumerate(page["statements"]):  # slowest first
            if page["p95_ms"] > target_ms or s["p95_ms"] > 20 or rank < 2:
                wanted.append((kind, s["sql"]))
    out = []
    engine = create_db_engine(url, pool=False)
    with engine.connect() as conn:
        for kind, key in wanted:
            if not key.lstrip().upper().startswith("SELECT"):
                continue
            ms, (statement, params) = slowest[(kind, key)]
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()
            out.append(
                {
                    "page": kind,
                    "sql": key,
                    "params": {k: str(v) for k, v in dict(params or {}).items()},
                    "slowest_ms": ms,
                    "plan": [str(r[0]) for r in rows],
                }
            )
    engine.dispose()
    return out


# -- the report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "saga_worker_commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_files": len([x for x in git("status", "--porcelain").splitlines() if x]),
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| page | p50 (ms) | p95 (ms) | max (ms) | SQL p50 (ms) | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for page in report["pages"].values():
        errors = f" ({page['errors']} errors)" if page["errors"] else ""
        lines.append(
            f"| {page['what']} | {page['p50_ms']:.1f} | {page['p95_ms']:.1f} | "
            f"{page['max_ms']:.1f} | {page['db_p50_ms']:.1f} | {page['n']}{errors} |"
        )
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[console {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale-sagas", "--sagas", dest="sagas", type=int, default=1_000_000)
    parser.add_argument("--scale-audit", "--audit", dest="audit", type=int, default=10_000_000)
    parser.add_argument("--scale-stalled", "--stalled", dest="stalled", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per kind")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per kind")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, metavar="KIND")
    parser.add_argument("--target-ms", type=float, default=200.0, help="p95 that gets plans")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--reuse", action="store_true", help="keep a loaded bench_console of the same sizes"
    )
    parser.add_argument("--keep", action="store_true", help="do not drop bench_console after")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--label", default="console")
    parser.add_argument("--note", default="", help="free text kept in the JSON (conditions)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    admin_url = os.environ.get("BENCH_DATABASE_URL")
    if not admin_url:
        print("BENCH_DATABASE_URL must be set (bench/run.sh sets it)")
        return 2
    began = time.monotonic()
    report: dict[str, Any] = {"meta": machine(), "note": args.note}
    prepared = prepare(admin_url, args.sagas, args.stalled, args.audit, args.reuse)
    engine = create_db_engine(prepared["url"], pool=False)
    with engine.connect() as conn:
        report["meta"]["postgresql"] = {
            s: str(conn.execute(text(f"SHOW {s}")).scalar())
            for s in ("server_version", "shared_buffers", "work_mem", "effective_cache_size")
        }
    facts = {"sagas": args.sagas, **describe(engine)}
    engine.dispose()
    report["data"] = {
        "sagas": args.sagas,
        "stalled_generated": args.stalled,
        "live_not_due": LIVE_NOT_DUE,
        "audit_rows_generated": args.audit,
        "load": prepared,
        **facts,
    }
    report.update(measure(prepared["url"], args, facts))
    if not args.keep:
        from .scale import drop_database

        drop_database(admin_url, DATABASE)
    report["meta"]["total_seconds"] = time.monotonic() - began
    report["meta"]["loadavg_end"] = os.getloadavg()
    path = Path(args.results) / f"{args.label}.json"
    write_json(path, report)
    print(table(report))
    slow = [k for k, p in report["pages"].items() if p["p95_ms"] > args.target_ms]
    print(f"\npages over {args.target_ms:.0f} ms at p95: {', '.join(slow) or 'none'}")
    log(f"wrote {path} ({report['meta']['total_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
