"""Where a saga_worker step spends its time: py-spy over the worker children during a burst.

``py-spy record --subprocesses --idle --format raw`` samples every process of the worker
(main process and both prefork children) in wall-clock time, including time blocked on
sockets, so database and broker round trips show up next to Python work. Each sample of a
child's task is put in a phase (by the saga_worker frame it runs under) and a kind (by its
leaf frame: inside psycopg, inside redis-py, or Python). CPU per process comes from /proc
(`CpuMeter`), not from here.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Celery

from .common import CpuMeter, DoneList, PgProbe, as_json, redis_client, run_burst
from .systems import Context, Plan, SagaWorker

#: Phases of a worker child's busy time: the first match walking from the task's entry
#: towards the leaf names what the time was spent for.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("saga.start: parse + validate request", ("parse_start (", "check_context (")),
    ("saga.start: create txn (checkpoint + audit)", ("SagaStore.create (",)),
    ("step: parse message + token", ("parse_attempt_ref (", "token_valid (")),
    ("step: pending check (read checkpoint)", ("load_for_step (",)),
    ("step: transition txn (store.apply)", ("SagaStore.apply (",)),
    ("dispatch: send_task of next step", ("CeleryDispatcher.send (",)),
    ("hooks: metrics", ("MetricsHook.",)),
    ("hooks: bench (timing file, done signal)", ("BenchHook.",)),
    ("step: the action itself", ("bench/sagas.py",)),
    ("step: output check", ("_output_problem (",)),
    ("celery: task trace, ack, result, events", ("celery/", "kombu/", "billiard/")),
)
#: Inside the transition transaction: what a statement's time goes to.
TXN_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pool checkout + pre-ping", ("_checkout (", "_do_ping", "do_ping (")),
    ("audit rows: redact + SHA-256 chain", ("build_rows (",)),
    ("core transition()", ("transition (saga_worker/core",)),
    ("row decode (saga_from_row)", ("saga_from_row (",)),
    ("COMMIT", ("Connection.commit (psycopg", "_commit_impl (")),
    (
        "statement build + compile (SQLAlchemy)",
        (
            "_compile_w_cache",
            "values (<sqlalchemy",
            "_generate_cache_key",
            "Select.where",
            "update (",
            "saga_to_row (",
        ),
    ),
    ("execute + round trip", ("Connection.execute (sqlalchemy", "exec_driver_sql (")),
)
DB_WAIT = (
    "Connection.wait (psycopg",
    "psycopg/waiting",
    "_exec_command (psycopg",
    "_execute_send (psycopg",
    "_communicate_gen (psycopg",
    "_send_query_prepared",
)
REDIS_WAIT = ("redis/connection.py", "redis/_parsers/socket.py")
#: The worker's main process (consumer): what its busy time is spent on.
MAIN_PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("task events: publish to Redis", ("EventDispatcher",)),
    ("ack (acks_late)", ("QoS.ack (", "basic_ack (")),
    ("receive + decode message", ("_brpop_read (", "_deliver (", "on_task_received", "guarded")),
    ("hand job to a child (pool IPC)", ("_write_job", "schedule_writes")),
    ("results from children", ("ResultHandler",)),
    ("Redis client objects", ("_create_client (",)),
)
CHILD_IDLE = (
    "Connection._recv (billiard",
    "Connection._poll (billiard",
    "_wait_for_syn",
    "Connection.poll (billiard",
    "Connection.recv (billiard",
)


def _match(frames: list[str], table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for name, needles in table:  # the table's order is the priority
        if any(n in frame for frame in frames for n in needles):
            return name
    return None


def _kind(leaf: str) -> str:
    if any(n in leaf for n in DB_WAIT):
        return "in psycopg (PostgreSQL round trips)"
    if any(n in leaf for n in REDIS_WAIT):
        return "in redis-py (Redis round trips)"
    return "Python"


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Child busy time by phase and kind, main-process time, from a py-spy raw file.

    Background threads (metrics HTTP server, pool supervisors) are left out; the children's
    and the main process's main threads are what a step's cost runs on.
    """
    phases: Counter[tuple[str, str]] = Counter()
    txn_parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    main: Counter[str] = Counter()
    child_idle = child_busy = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith("process ")]
        if any("Thread._bootstrap" in f for f in code[:3]):
            continue
        leaf = code[-1] if code else ""
        if len(procs) < 2:  # the worker's main process: consumer loop, pool I/O, acks
            if "poll (kombu" in leaf or "epoll" in leaf:
                main["idle (epoll)"] += count
            else:
                main[f"busy: {_match(code, MAIN_PHASES) or 'other'}"] += count
            continue
        if any(n in leaf for n in CHILD_IDLE) or not any("trace_task" in f for f in code):
            child_idle += count
            continue
        child_busy += count
        in_task = code[next(i for i, f in enumerate(code) if "trace_task" in f) :]
        phase = _match(in_task, PHASES) or "other"
        phases[(phase, _kind(leaf))] += count
        if phase == "step: transition txn (store.apply)":
            apply_at = next(i for i, f in enumerate(in_task) if "SagaStore.apply (" in f)
            part = _match(in_task[apply_at:], TXN_PARTS) or "other"
            txn_parts[f"{part} / {_kind(leaf)}"] += count
        leaves[leaf] += count

    def pct(value: int, whole: int) -> float:
        return round(100 * value / whole, 1) if whole else 0.0

    by_phase: Counter[str] = Counter()
    for (phase, _), count in phases.items():
        by_phase[phase] += count
    apply_total = by_phase["step: transition txn (store.apply)"]
    return {
        "child_samples": child_busy + child_idle,
        "child_busy_pct": pct(child_busy, child_busy + child_idle),
        "child_busy_by_phase_pct": {k: pct(v, child_busy) for k, v in by_phase.most_common()},
        "child_busy_by_phase_and_kind_pct": {
            f"{p} / {k}": pct(v, child_busy) for (p, k), v in phases.most_common()
        },
        "transition_txn_parts_pct_of_txn": {
            k: pct(v, apply_total) for k, v in txn_parts.most_common()
        },
        "child_top_leaf_frames_pct": [(f, pct(c, child_busy)) for f, c in leaves.most_common(top)],
        "main_process_pct": {k: pct(v, sum(main.values())) for k, v in main.most_common()},
    }


def profile_saga_worker(ctx: Context, plan: Plan) -> dict[str, Any]:
    """Run one saga_worker burst under py-spy; returns the bucketed profile."""
    py_spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    system = SagaWorker(ctx)
    system.start()
    assert system.process is not None
    raw = ctx.work_dir / "saga_worker-profile.txt"
    producer = Celery("bench-producer", broker=ctx.redis_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])

    def send(saga_id: str) -> None:
        producer.send_task(
            "saga.start",
            kwargs={"saga_type": "bench_saga", "context": {"n": 1}, "saga_id": saga_id},
            queue=system.queue,
        )

    done = DoneList(redis_client(ctx.redis_url), "bench:done:saga_worker")
    probe = PgProbe(ctx.admin_url)
    pid = str(system.process.popen.pid)
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            pid,
            "--subprocesses",
            "--idle",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(ctx.work_dir / "py-spy.log").open("wb"),
    )
    try:
        time.sleep(1.0)  # let py-spy attach to every process
        ids = [f"profile-{i}" for i in range(plan.n)]
        burst = run_burst(
            send, ids, done, probe, plan.burst_timeout, CpuMeter({system.process.popen.pid})
        )
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(timeout=60)
        probe.close()
        producer.close()
        system.stop()
    result = summarize(raw)
    result["burst_under_profiler"] = as_json(burst)
    result["raw_file"] = str(raw)
    return result
