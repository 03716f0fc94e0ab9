"""Chaos: 300 example sagas while workers are SIGKILLed and Redis and PostgreSQL restart.

Afterwards, within a bounded time, every saga must be terminal in the state its fault
injection dictates, `example_backtests` must match those outcomes exactly, and every audit
trail must walk the steps in order with no gap. Needs the servers scripts/test.sh starts
(it restarts them); set CHAOS_SEED to replay a run's random choices. A worker that exits on
its own is restarted, as its process supervisor would, and counted in the printed figures.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from saga_worker.audit.verify import verify_chain
from saga_worker.core.model import Saga
from saga_worker.examples.backtest import example_backtests, simulate

from .conftest import fresh_postgres_database
from .processes import Rig, Servers, children, count_lines, kill_group, restartable_servers

pytestmark = pytest.mark.integration

SAGAS = 300
SUBMIT_SECONDS = 36.0
# The example's steps time out after 30 s: a lost message is re-sent 30 s + GRACE after it
# was sent, and the last disruption comes at ~40 s, so everything settles well before this.
DRAIN_TIMEOUT = 150.0
GRACE = "2"
STEPS = ("create_backtest", "run_strategy", "save_results")
TERMINAL_EVENT = {
    "COMPLETED": "saga_complete",
    "COMPENSATED": "saga_compensated",
    "FAILED": "saga_failed",
    "ABORTED": "saga_aborted",
}


@dataclass(frozen=True)
class Expected:
    """What a saga's fault injection dictates: its final state and its example row."""

    state: str
    row: (
        str | None
    )  # None: no row; "results": row with the strategy's results; "null": row, no results


def expected(context: dict[str, Any]) -> Expected:
    failing = context.get("fail_step")
    if failing is None:
        return Expected("COMPLETED", "results")
    completed = STEPS[: STEPS.index(failing)]
    broken = context.get("fail_compensation")
    if broken in completed:
        # Rollback goes on past the failed compensation; the row stays only if its own
        # compensation (create_backtest's) is the one that failed. save_results never ran.
        return Expected("FAILED", "null" if broken == "create_backtest" else None)
    return Expected("COMPENSATED", None)


def make_context(rng: random.Random, strategy_id: int) -> dict[str, Any]:
    """A mix of outcomes; at most one injected failure per step, so that a restart of
    PostgreSQL (which can fail one attempt of a step touching the database) never turns an
    expected success into a failure: every step has 3 attempts."""
    context: dict[str, Any] = {"strategy_id": strategy_id}
    kind = rng.choices(
        ["complete", "flaky", "fail", "fail_compensation", "slow"], [40, 20, 15, 15, 10]
    )[0]
    if kind == "flaky":
        context["flaky_step"] = {"step": rng.choice(STEPS), "failures": 1}
    elif kind == "fail":
        context["fail_step"] = rng.choice(STEPS)
    elif kind == "fail_compensation":
        failing = rng.choice(STEPS[1:])
        context["fail_step"] = failing
        context["fail_compensation"] = rng.choice(STEPS[: STEPS.index(failing)])
    elif kind == "slow":
        context["slow_step"] = {"step": rng.choice(STEPS), "seconds": rng.choice([1, 2, 3])}
    return context


def trail_problems(saga: Saga, rows: list[dict[str, Any]]) -> list[str]:
    """Why an audit trail does not run from saga_start to its terminal event step by step."""
    kinds = [r["event_type"] for r in rows]
    problems = [f"chain: {p}" for p in verify_chain(rows)]
    if not kinds or kinds[0] != "saga_start" or kinds.count("saga_start") != 1:
        problems.append("does not begin with its one saga_start")
    if not kinds or kinds[-1] != TERMINAL_EVENT.get(saga.state.value):
        problems.append(f"does not end with the event of {saga.state.value}")
    if sum(kind in TERMINAL_EVENT.values() for kind in kinds) != 1:
        problems.append("more than one terminal event")
    stamps = [r["timestamp"] for r in rows]
    if stamps != sorted(stamps):
        problems.append("timestamps go backwards")
    done = 0  # steps completed so far: the forward walk is at step `done`
    undo: int | None = None  # the step the rollback is at
    for row in rows:
        kind, index = row["event_type"], row["step_index"]
        if kind in ("step_start", "step_retry", "step_complete", "step_failed"):
            if undo is not None or index != done:
                problems.append(f"{kind} of step {index} with {done} steps completed")
            if kind == "step_complete":
                done += 1
            elif kind == "step_failed":
                # A step whose outcome is unknown (timed out, lost, stalled) is compensated
                # itself first; otherwise the rollback starts at the step before it.
                own = bool((row["event_data"] or {}).get("own_compensation"))
                undo = done if own else done - 1
        elif kind.startswith("compensation_"):
            if undo is None or index != undo:
                problems.append(f"{kind} of step {index} while rolling back at {undo}")
            if kind in ("compensation_complete", "compensation_failed") and undo is not None:
                undo -= 1
        elif kind == "saga_recovered" and index != (done if undo is None else undo):
            problems.append(f"saga_recovered of step {index} not the pending one")
    if [r["step_index"] for r in rows if r["event_type"] == "step_complete"] != list(range(done)):
        problems.append("step_complete indexes are not 0, 1, ... in order")
    if saga.completed_steps != STEPS[:done]:
        problems.append(f"checkpoint completed_steps {saga.completed_steps} != audit")
    if saga.state.value != "COMPLETED" and undo != -1:
        problems.append(f"rollback stopped at step {undo}")
    return problems


@dataclass
class Chaos:
    """What the test did to the system, and when."""

    began: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    last: float = 0.0

    def note(self, what: str, kind: str) -> None:
        self.last = time.monotonic()
        self.counts[kind] += 1
        self.events.append(f"{self.last - self.began:5.1f}s {what}")


@pytest.fixture
def servers() -> Servers:
    return restartable_servers()


@pytest.fixture
def rig(pg_admin_url: str, broker_url: str, tmp_path: Path, servers: Servers) -> Iterator[Rig]:
    rig = Rig.create(
        fresh_postgres_database(pg_admin_url),
        broker_url,
        tmp_path,
        SAGA_STALL_GRACE_SECONDS=GRACE,
        SAGA_RECOVERY_INTERVAL_SECONDS="1",
    )
    try:
        yield rig
    finally:
        rig.close()


def kill_child(rig: Rig, chaos: Chaos, rng: random.Random) -> None:
    """SIGKILL one pool child of the current worker (a task dies mid-run)."""
    main = rig.worker.process.pid
    # The pool may be replacing a child, or a restarted worker still starting its pool: wait
    # for a child (a kill that finds none is counted as missed, and the tests check the count).
    pool: list[int] = []
    deadline = time.monotonic() + 10
    while not (pool := children(main)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not pool:
        group = subprocess.run(
            ["ps", "-o", "pid,ppid,stat,args", "-g", str(main)], capture_output=True, text=True
        ).stdout
        chaos.note(f"no pool child of worker {main} to kill:\n{group}", "missed kills")
        return
    victim = rng.choice(pool)
    os.kill(victim, signal.SIGKILL)
    chaos.note(f"SIGKILL pool child {victim} of {pool}", "pool child kills")


def kill_worker(rig: Rig, chaos: Chaos) -> None:
    """SIGKILL the whole worker (main process and pool, a crashed host), then restart it."""
    kill_group(rig.worker.process)
    chaos.note(f"SIGKILL worker {rig.worker.process.pid} and its pool", "worker kills")
    rig.start_worker(concurrency=3)
    chaos.note("worker restarted", "worker restarts")


@dataclass
class Outcome:
    """What a chaos run did, for the caller's own checks on top of run_chaos's."""

    chaos: Chaos
    recoveries: int  # saga_recovered audit rows: stalled attempts the sweep re-sent
    skipped: int  # redelivered step messages skipped as no longer pending


def run_chaos(
    rig: Rig,
    sagas: int,
    submit_seconds: float,
    plan: Callable[[random.Random], list[tuple[float, Callable[[Chaos], None]]]],
    name: str = "chaos",
) -> Outcome:
    """Submit `sagas` example sagas over `submit_seconds` while `plan` disrupts the system,
    then check that every saga settled in its dictated state, with its effects exactly once
    and an audit trail without gaps. `plan` gets the run's random generator and returns
    (seconds from the start, action) pairs."""
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    contexts = {
        f"{name}-{i:03d}-{uuid.uuid4().hex[:6]}": make_context(rng, i) for i in range(sagas)
    }
    saga_ids = list(contexts)
    rig.start_worker(concurrency=3)
    rig.start_beat()
    chaos = Chaos()

    def submit() -> None:
        for n, (saga_id, context) in enumerate(contexts.items()):
            time.sleep(max(0.0, chaos.began + n * submit_seconds / sagas - time.monotonic()))
            publish(rig, saga_id, context)

    def supervise() -> None:
        """Restart a worker that exited on its own, as its process supervisor would."""
        code = rig.worker.process.poll()
        if code is not None:
            chaos.note(f"worker exited on its own ({code}): restarted", "unplanned worker exits")
            rig.start_worker(concurrency=3)

    producer = threading.Thread(target=submit, name="chaos-producer")
    producer.start()
    for at, action in plan(rng):
        while time.monotonic() < chaos.began + at:
            supervise()
            time.sleep(0.2)
        action(chaos)
    while producer.is_alive() and time.monotonic() < chaos.began + 120:
        supervise()
        producer.join(0.2)
    assert not producer.is_alive()
    chaos_ended = time.monotonic()

    # A start lost with the broker (or with a killed worker) before its saga reached the
    # database cannot be recovered from the database: the producer sends it again, which is
    # safe because a saga_id starts at most one saga.
    resent_starts: set[str] = set()
    deadline = chaos_ended + DRAIN_TIMEOUT
    waiting = set(saga_ids)
    last_resend = chaos_ended
    while waiting and time.monotonic() < deadline:
        supervise()
        known = {s.saga_id: s for s in rig.load_many(waiting)}
        waiting = {s for s in waiting if s not in known or not known[s].state.is_terminal}
        missing = [s for s in waiting if s not in known]
        if missing and time.monotonic() - last_resend > 10:
            for saga_id in missing:
                publish(rig, saga_id, contexts[saga_id])
            resent_starts.update(missing)
            last_resend = time.monotonic()
        time.sleep(0.5)
    drained = time.monotonic()
    assert not waiting, f"{len(waiting)} sagas not terminal {DRAIN_TIMEOUT}s after the chaos"

    sagas_by_id = {s.saga_id: s for s in rig.load_many(saga_ids)}
    trails = rig.audit_rows(saga_ids)
    with rig.store.engine.connect() as conn:
        rows = {r["saga_id"]: dict(r) for r in conn.execute(select(example_backtests)).mappings()}
    outcome = Counter(s.state.value for s in sagas_by_id.values())
    recoveries = sum(r["event_type"] == "saga_recovered" for t in trails.values() for r in t)
    recovered_sagas = sum(
        any(r["event_type"] == "saga_recovered" for r in t) for t in trails.values()
    )
    skipped = count_lines(rig.worker_logs(), "is not pending")
    print(
        f"\n[{name}] seed {seed}: {sagas} sagas {dict(outcome)}\n"
        + "\n".join(f"  {e}" for e in chaos.events)
        + f"\n  disruptions: {dict(chaos.counts)}"
        + f"\n  recoveries: {recoveries} saga_recovered rows in {recovered_sagas} sagas; "
        f"{len(resent_starts)} lost starts re-sent by the producer; "
        f"{skipped} redelivered step messages skipped"
        + f"\n  drained {drained - chaos.last:.1f}s after the last disruption; "
        f"whole run {drained - chaos.began:.1f}s"
    )

    # Since the broker transports survive a restart, no worker may die on its own.
    assert chaos.counts.get("unplanned worker exits", 0) == 0, chaos.events

    wrong_state = {
        s: (
            sagas_by_id[s].state.value,
            expected(c).state,
            sagas_by_id[s].error,
            [(r["event_type"], r["step_name"], r["error_message"]) for r in trails[s]],
        )
        for s, c in contexts.items()
        if sagas_by_id[s].state.value != expected(c).state
    }
    assert not wrong_state, f"seed {seed}: sagas not in their dictated state: {wrong_state}"
    wrong_rows = {}
    for saga_id, context in contexts.items():
        row, want = rows.pop(saga_id, None), expected(context).row
        got = None if row is None else ("null" if row["results"] is None else "results")
        if got != want or (
            want == "results" and row is not None and row["results"] != simulate(row["strategy_id"])
        ):
            wrong_rows[saga_id] = (got, want)
        if row is not None and row["strategy_id"] != context["strategy_id"]:
            wrong_rows[saga_id] = ("strategy_id", row["strategy_id"])
    assert not wrong_rows, f"seed {seed}: example_backtests does not match: {wrong_rows}"
    assert not rows, f"rows of unknown sagas: {sorted(rows)}"
    bad_trails = {
        s: problems for s in saga_ids if (problems := trail_problems(sagas_by_id[s], trails[s]))
    }
    assert not bad_trails, f"seed {seed}: audit trails with gaps: {bad_trails}"
    return Outcome(chaos, recoveries, skipped)


def test_no_saga_is_lost_or_applied_twice_under_chaos(rig: Rig, servers: Servers) -> None:
    def restart_redis(chaos: Chaos) -> None:
        took = servers.restart_redis()
        chaos.note(f"Redis restarted empty in {took:.1f}s", "Redis restarts")

    def restart_postgres(chaos: Chaos) -> None:
        took = servers.restart_postgres()
        chaos.note(f"PostgreSQL restarted in {took:.1f}s", "PostgreSQL restarts")

    def plan(rng: random.Random) -> list[tuple[float, Callable[[Chaos], None]]]:
        # Random moments inside fixed windows (seconds from the start), so the disruptions
        # never overlap yet land at different points of the work each run.
        def child(chaos: Chaos) -> None:
            kill_child(rig, chaos, rng)

        def worker(chaos: Chaos) -> None:
            kill_worker(rig, chaos)

        return [
            (rng.uniform(2, 6), child),
            (rng.uniform(8, 12), worker),
            (rng.uniform(14, 18), restart_redis),
            (rng.uniform(20, 23), child),
            (rng.uniform(24, 28), restart_postgres),
            (rng.uniform(29, 32), child),
            (rng.uniform(33, 36), worker),
            (rng.uniform(37, 40), child),
        ]

    outcome = run_chaos(rig, SAGAS, SUBMIT_SECONDS, plan)
    # Every planned disruption happened (none missed its target)...
    assert outcome.chaos.counts["pool child kills"] == 4, outcome.chaos.events
    assert outcome.chaos.counts["worker kills"] == 2, outcome.chaos.events
    # ...and did strand work: stalled attempts were recovered by the sweep.
    assert outcome.recoveries > 0


def publish(rig: Rig, saga_id: str, context: dict[str, Any]) -> None:
    """send_task saga.start, retrying while the broker is restarting."""
    for _ in range(150):
        try:
            rig.start_saga("backtest_workflow", context, saga_id)
            return
        except Exception:
            time.sleep(0.2)
    raise AssertionError(f"could not publish the start of {saga_id} for 30 s")
