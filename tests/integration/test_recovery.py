"""Crash recovery end to end: real workers, real `celery beat` processes, Redis, PostgreSQL.

Each test runs its own worker(s) and beat(s) on its own queue against one database of this
module. Stalls are made the way production makes them: nothing sent after a commit (a crash
between commit and enqueue), a worker SIGKILLed mid-step, messages deleted from Redis, a
remote service that never answers.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.connection import Connection

import tests.fixtures.recovery_sagas as fixtures
from saga_worker import registry
from saga_worker.config import Settings
from saga_worker.core.commands import RunAttempt
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition
from saga_worker.core.events import StartRequested
from saga_worker.core.model import Attempt, Direction, Saga
from saga_worker.engine import SagaEngine, utcnow
from saga_worker.recovery import SweepResult, sweep
from saga_worker.worker.dispatch import CeleryDispatcher
from tests.waiting import wait_for

from .conftest import SIGNING_KEY, fresh_postgres_database, start_worker
from .processes import Rig, count_lines, kill_group, lines_with, restartable_servers, unique

pytestmark = pytest.mark.integration

GRACE = "1"  # SAGA_STALL_GRACE_SECONDS of every process here
INTERVAL = "0.5"  # SAGA_RECOVERY_INTERVAL_SECONDS of every beat here
# The crash happened a minute ago: the first attempts' deadlines (10 s + grace) have passed.
CRASHED_AGO = timedelta(seconds=60)
#: Runs a worker with its clock off the others' (Debian's faketime; scripts/test.sh installs it).
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture
def database_url(pg_admin_url: str) -> str:
    # One database per test: sagas a test leaves stalled on purpose (the concurrent sweeps')
    # would otherwise be swept by the next test's worker and counted as its own sends.
    return fresh_postgres_database(pg_admin_url)


# The grace of a test that sends a burst (indirect param of `rig`): each message then has
# this long to get through the queue before it expires (docs/recovery.md, Backlogs).
BURST_GRACE = "20"


@pytest.fixture
def rig(
    database_url: str, broker_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Rig]:
    rig = Rig.create(
        database_url,
        broker_url,
        tmp_path,
        SAGA_STALL_GRACE_SECONDS=getattr(request, "param", GRACE),
        SAGA_RECOVERY_INTERVAL_SECONDS=INTERVAL,
        REC_DEAD_QUEUE=unique("rec-dead"),
        REC_REMOTE_QUEUE=unique("rec-remote"),
    )
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def broker(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


class SendNothing:
    """The dispatcher of a process that crashed right after committing: nothing is sent."""

    def __init__(self) -> None:
        self.lost: list[RunAttempt] = []

    def send(
        self, definition: SagaDefinition, saga: Saga, command: RunAttempt, checkpoint: Any = None
    ) -> None:
        self.lost.append(command)


class CountSends:
    """Counts the attempts an engine sends, per (saga_id, step, direction, attempt)."""

    def __init__(self) -> None:
        self.sent: Counter[tuple[str, int, str, int]] = Counter()
        self._lock = threading.Lock()

    def send(
        self, definition: SagaDefinition, saga: Saga, command: RunAttempt, checkpoint: Any = None
    ) -> None:
        with self._lock:
            self.sent[
                (saga.saga_id, command.step_index, command.direction.value, command.attempt)
            ] += 1


def engine_for(rig: Rig, dispatcher: Any, clock_offset: timedelta = -CRASHED_AGO) -> SagaEngine:
    """An engine in the test process on the rig's database (as a worker's would be)."""
    limits = Limits(stall_grace_seconds=float(rig.env["SAGA_STALL_GRACE_SECONDS"]))
    return SagaEngine(rig.store, dispatcher, limits, clock=lambda: utcnow() + clock_offset)


def start_in_process(engine: SagaEngine, saga_type: str, count: int, **context: Any) -> list[str]:
    ids = [f"{saga_type}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for saga_id in ids:
        assert engine.start(StartRequested(saga_id, saga_type, dict(context))).created
    return ids


def recovered_rows(rig: Rig, saga_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    trails = rig.audit_rows(saga_ids)
    return {
        saga_id: [r for r in rows if r["event_type"] == "saga_recovered"]
        for saga_id, rows in trails.items()
    }


def received(rig: Rig, task: str) -> int:
    """How many messages of `task` the rig's workers received (each is one enqueue)."""
    return sum(
        1 for line in lines_with(rig.worker_logs(), f"Task {task}[") if line.endswith("received")
    )


def messages_about(broker: redis.Redis, saga_id: str, queue: str) -> list[dict[str, Any]]:
    """Messages of `saga_id` waiting in `queue` or held unacknowledged by a consumer."""
    raw = [m for m in broker.lrange(queue, 0, -1)]
    raw += [json.loads(v)[0] for v in broker.hvals("unacked")]
    found = []
    for item in raw:
        message = json.loads(item) if isinstance(item, bytes | str) else item
        if saga_id in str(message.get("headers", {}).get("kwargsrepr", "")):
            found.append(message)
    return found


# -- (a) a crash between the checkpoint commit and the enqueue, two beats ------------------


@pytest.mark.parametrize("rig", [BURST_GRACE], indirect=True)
def test_commit_without_enqueue_is_recovered_once_under_two_beats(rig: Rig) -> None:
    """Sagas committed but never sent; two beats race to recover them; each is sent once.

    The burst of 240 step messages waits in the queue: a grace of 1 s would let copies
    expire there and be recovered again, which is not what this test counts."""
    lost = SendNothing()
    saga_ids = start_in_process(engine_for(rig, lost), "rec_quick", 120)
    assert len(lost.lost) == 120  # the first attempt of every saga was never enqueued
    # Two beats first, then the worker: their queued sweeps start together on both processes.
    first, second = rig.start_beat(), rig.start_beat()
    rig.start_worker(concurrency=2)
    began = time.monotonic()
    sagas = rig.wait_all(saga_ids, timeout=90)
    drained = time.monotonic() - began
    # A second send of some attempt would arrive after its saga completed: wait until
    # everything queued by now has run, so that the counts below are final.
    rig.settle()

    assert {s.state.value for s in sagas.values()} == {"COMPLETED"}
    recovered = recovered_rows(rig, saga_ids)
    # One recovery per saga, of its first step's first attempt: no saga was recovered twice.
    keys = Counter(
        (saga_id, r["step_index"], r["event_data"]["attempt"], r["event_data"]["recoveries"])
        for saga_id, rows in recovered.items()
        for r in rows
    )
    assert sorted(keys.values()) == [1] * 120
    assert {(k[1], k[2], k[3]) for k in keys} == {(0, 1, 1)}
    # ...and every recovery enqueued the attempt exactly once: the workers received exactly
    # one message of each step per saga, and the sweeps logged one re-send per saga.
    assert received(rig, "saga.rec_quick.one") == 120
    assert received(rig, "saga.rec_quick.two") == 120
    resent = lines_with(rig.worker_logs(), "re-sent (recovery 1)")
    assert sorted(line.split("saga ")[1].split(":")[0] for line in resent) == sorted(saga_ids)
    assert count_lines(rig.worker_logs(), "is not pending") == 0
    assert first.sent() >= 2 and second.sent() >= 2
    contended = count_lines(rig.worker_logs(), "claimed by another recovery sweep") + count_lines(
        rig.worker_logs(), "already recovered by another scan"
    )
    sweeps = sum(
        1 for line in lines_with(rig.worker_logs(), "saga.recover[") if "succeeded" in line
    )
    print(
        f"\n[two beats] 120 sagas recovered once each in {drained:.1f}s; beats sent "
        f"{first.sent()} + {second.sent()} sweeps, {sweeps} ran, {contended} contended rows"
    )


def test_concurrent_sweeps_send_each_stalled_attempt_once(rig: Rig) -> None:
    """Two sweeps started at the same instant on the same 200 stalled sagas (SKIP LOCKED)."""
    saga_ids = start_in_process(engine_for(rig, SendNothing()), "rec_quick", 200)
    sends = CountSends()
    engine = engine_for(rig, sends, clock_offset=timedelta(0))
    barrier = threading.Barrier(2)
    results: list[SweepResult] = []

    def run() -> None:
        barrier.wait()
        results.append(sweep(rig.store, engine, utcnow(), batch=50))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(results) == 2
    assert sends.sent == Counter({(s, 0, "forward", 1): 1 for s in saga_ids})
    assert sum(r.recovered for r in results) == 200
    assert sum(r.failed for r in results) == 0
    # The sweeps did race: rows one of them held or had just recovered were skipped by the other.
    assert sum(r.skipped for r in results) > 0
    assert all(len(rows) == 1 for rows in recovered_rows(rig, saga_ids).values())
    print(f"\n[concurrent sweeps] {results}")


# -- (b) a worker SIGKILLed mid-step -----------------------------------------------------------


def test_worker_killed_mid_step_is_recovered_after_its_deadline(
    rig: Rig, broker: redis.Redis, broker_url: str
) -> None:
    marker_dir = rig.folder / "markers"
    marker_dir.mkdir()
    rig.start_worker()
    rig.start_beat()
    saga_id = rig.start_saga(
        "rec_kill", {"marker_dir": str(marker_dir), "hold_seconds": 60}, unique("kill")
    )
    started = marker_dir / f"{saga_id}.started"
    wait_for(started.exists, 30, "the step to start", details=rig.worker.log_tail)
    killed_pid = int(started.read_text())
    kill_group(rig.worker.process)  # main process and pool children, mid-step
    killed_at = utcnow()

    saga = rig.store.load(saga_id)
    assert saga is not None and saga.state.value == "RUNNING" and saga.pending is not None
    stalled_deadline = saga.pending.deadline
    assert saga.pending.key() == (1, Direction.FORWARD, 1)
    # The killed worker's message stays unacknowledged in Redis (visibility_timeout: an hour).
    orphans = messages_about(broker, saga_id, rig.queue)
    assert [m["headers"]["task"] for m in orphans] == ["saga.rec_kill.hold"]

    rig.start_worker()
    saga = rig.wait_all([saga_id], timeout=60)[saga_id]
    assert saga.state.value == "COMPLETED"
    # The re-sent attempt ran in another process and found the first run's marker.
    assert saga.context["held_runs"] == 2 and saga.context["held_pid"] != killed_pid
    rows = rig.audit_rows([saga_id])[saga_id]
    kinds = [r["event_type"] for r in rows]
    assert kinds == [
        "saga_start",
        "step_start",
        "step_complete",
        "step_start",
        "saga_recovered",
        "step_start",
        "step_complete",
        "saga_complete",
    ]
    recovery = rows[4]
    assert recovery["step_index"] == 1
    assert recovery["event_data"]["attempt"] == 1 and recovery["event_data"]["recoveries"] == 1
    assert recovery["timestamp"] >= stalled_deadline >= killed_at - timedelta(seconds=10)
    # The same attempt was re-sent: no attempt was used up.
    assert [r["event_data"]["attempt"] for r in rows if r["event_type"] == "step_start"] == [
        1,
        1,
        1,
    ]

    # An hour later Redis would hand the orphaned message back: it must change nothing.
    tag = orphans[0]["properties"]["delivery_tag"]
    with Connection(broker_url) as connection:
        connection.default_channel.qos.restore_by_tag(tag)
    # The new worker discarded the redelivered message unrun: it expired at its start-by
    # time, long before (at most one copy of an attempt can start).
    orphan_id = orphans[0]["headers"]["id"]
    wait_for(
        lambda: any(
            "Discarding revoked task" in line
            for line in lines_with([rig.worker.log_path], orphan_id)
        ),
        30,
        "the redelivered message to be discarded",
        details=rig.worker.log_tail,
    )
    assert count_lines([rig.worker.log_path], "is not pending") == 0
    assert [r["id"] for r in rig.audit_rows([saga_id])[saga_id]] == [r["id"] for r in rows]
    # ...and acknowledged it (after the task ended): gone from the queue and from unacked.
    wait_for(
        lambda: messages_about(broker, saga_id, rig.queue) == [],
        30,
        "the redelivered message to be acknowledged",
    )


# -- (c) messages lost by the broker ---------------------------------------------------------


@pytest.mark.parametrize("worker_clock", ["", "+5s", "-5s"], ids=["same", "ahead", "behind"])
def test_messages_lost_by_the_broker_are_recovered(
    rig: Rig, broker: redis.Redis, worker_clock: str
) -> None:
    """Lost first attempts are re-sent by the sweep once each; also with the worker's clock
    5 s off the beat's (libfaketime): the beat's saga.recover carries no wall-clock expiry, so
    no skew can make the worker drop every sweep (issue 14, item 6)."""
    producer = Celery("rec-dispatch", broker=rig.env["SAGA_BROKER_URL"], set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    settings = Settings.from_env(rig.env)
    dispatcher = CeleryDispatcher(producer, settings, SIGNING_KEY)
    try:
        saga_ids = start_in_process(engine_for(rig, dispatcher), "rec_quick", 40)
    finally:
        producer.close()
    # The first attempts are in Redis, on their version's queue, and no worker consumes it yet...
    steps = f"{rig.queue}.rec_quick.{registry.get('rec_quick').version}"
    assert broker.llen(steps) == 40
    # ...when the broker loses them (what a restart without persistence does to a queue).
    assert broker.delete(steps) == 1

    skewed = {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": worker_clock} if worker_clock else {}
    rig.env.update(skewed)
    try:
        rig.start_worker()
    finally:
        for name in skewed:
            del rig.env[name]
    rig.start_beat()
    sagas = rig.wait_all(saga_ids, timeout=60)
    rig.settle()  # a duplicate send would arrive after its saga completed
    assert {s.state.value for s in sagas.values()} == {"COMPLETED"}
    recovered = recovered_rows(rig, saga_ids)
    assert all(len(rows) == 1 for rows in recovered.values())
    assert {
        (r["step_index"], r["event_data"]["attempt"]) for rows in recovered.values() for r in rows
    } == {(0, 1)}
    assert received(rig, "saga.rec_quick.one") == 40


# -- (d) a retry held in the database ------------------------------------------------------------


def test_held_retry_is_sent_by_the_sweep_when_due(rig: Rig, broker: redis.Redis) -> None:
    rig.start_worker()
    rig.start_beat()
    saga_id = rig.start_saga("rec_held", {}, unique("held"))

    def held_retry() -> Attempt | None:
        saga = rig.store.load(saga_id)
        pending = None if saga is None else saga.pending
        return pending if pending is not None and pending.held else None

    held = wait_for(held_retry, 30, "the retry held in the database", details=rig.worker.log_tail)
    assert held.number == 2 and held.deadline == held.not_before
    # The retry is in the database only: no message of this saga in the queue or in flight
    # (once the first attempt's message is acknowledged, after its task returned: the held
    # retry was committed inside that task, so the ack may come a moment later).
    wait_for(
        lambda: messages_about(broker, saga_id, rig.queue) == [],
        3,
        "the first attempt's message to be acknowledged",
        details=lambda: str(messages_about(broker, saga_id, rig.queue)),
    )
    assert rig.store.load(saga_id).pending == held  # type: ignore[union-attr]  # still held

    saga = rig.wait_all([saga_id], timeout=60)[saga_id]
    rig.settle()  # a second send of the held retry would come later
    assert saga.state.value == "COMPLETED" and saga.context["succeeded_on"] == 2
    rows = rig.audit_rows([saga_id])[saga_id]
    assert [r["event_type"] for r in rows] == [
        "saga_start",
        "step_start",
        "step_retry",
        "step_start",
        "step_complete",
        "saga_complete",
    ]
    retry, second = rows[2], rows[3]
    assert retry["event_data"]["delay_seconds"] == fixtures.HELD_DELAY_SECONDS
    assert second["event_data"]["attempt"] == 2 and second["retry_count"] == 1
    # Sent when due: not before not_before, and within a few sweeps after it.
    waited = (second["timestamp"] - retry["timestamp"]).total_seconds()
    assert fixtures.HELD_DELAY_SECONDS <= waited <= fixtures.HELD_DELAY_SECONDS + 10
    assert second["timestamp"] >= held.not_before
    assert count_lines(rig.worker_logs(), f"saga {saga_id}: held retry of step 0") == 1


# -- (e) an attempt that keeps stalling ----------------------------------------------------------


def test_attempt_that_keeps_stalling_fails_with_stalled_too_often(
    rig: Rig, broker: redis.Redis
) -> None:
    rig.env["SAGA_MAX_RECOVERIES"] = "2"
    dead_queue = rig.env["REC_DEAD_QUEUE"]
    rig.start_worker()
    rig.start_beat()
    saga_id = rig.start_saga("rec_lost", {}, unique("lost"))
    try:
        saga = rig.wait_all([saga_id], timeout=90)[saga_id]
        sent_to_dead_queue = broker.llen(dead_queue)
    finally:
        broker.delete(dead_queue)

    assert saga.state.value == "COMPENSATED"
    assert saga.compensated_steps == ("reserve",)
    assert "stalled 3 times (max_recoveries=2)" in (saga.error or "")
    rows = rig.audit_rows([saga_id])[saga_id]
    recoveries = [r for r in rows if r["event_type"] == "saga_recovered"]
    assert [(r["step_index"], r["event_data"]["recoveries"]) for r in recoveries] == [
        (1, 1),
        (1, 2),
    ]
    failed = [r for r in rows if r["event_type"] == "step_failed"]
    assert len(failed) == 1 and failed[0]["step_name"] == "quote"
    assert failed[0]["event_data"]["error_type"] == "StalledTooOften"
    assert failed[0]["event_data"]["timed_out"] is True
    assert [r["event_type"] for r in rows][-3:] == [
        "compensation_start",
        "compensation_complete",
        "saga_compensated",
    ]
    # The first send and each of the two recoveries put exactly one message in the dead queue.
    assert sent_to_dead_queue == 3
    assert count_lines(rig.worker_logs(), "failed it as StalledTooOften") == 1


# -- a broker restart while a step runs ----------------------------------------------------------


def test_worker_survives_a_redis_restart_with_a_step_in_flight(rig: Rig) -> None:
    servers = restartable_servers()
    marker_dir = rig.folder / "markers"
    marker_dir.mkdir()
    rig.start_worker()
    rig.start_beat()
    first = rig.start_saga(
        "rec_kill", {"marker_dir": str(marker_dir), "hold_seconds": 3}, unique("blip")
    )
    started = marker_dir / f"{first}.started"
    wait_for(started.exists, 30, "the step to start", details=rig.worker.log_tail)
    servers.restart_redis()  # the running step's message is unacknowledged right now
    assert rig.wait_all([first], timeout=30)[first].state.value == "COMPLETED"
    # The same worker goes on consuming: a saga started after the restart completes too.
    second = rig.start_saga("rec_quick", {}, unique("after-blip"))
    assert rig.wait_all([second], timeout=15)[second].state.value == "COMPLETED"
    assert rig.worker.process.poll() is None
    assert count_lines(rig.worker_logs(), "Unrecoverable error") == 0


@pytest.mark.parametrize("served_by", ["saga worker", "remote service"])
def test_a_backlog_longer_than_timeout_and_grace_runs_each_step_once(
    rig: Rig, served_by: str
) -> None:
    """Issue 14, item 6: 40 starts on one process, each step 0.3 s with a 1 s timeout and a
    1 s queue allowance. Most step messages wait in the queue past their start-by time: Celery
    discards them unrun (in the saga worker, or in another team's service for a remote step),
    the sweep re-sends them with a doubled allowance, and every step still runs exactly once
    (at most one live copy of an attempt)."""
    runs = rig.folder / "runs.txt"
    runs.touch()
    saga_type = "rec_backlog"
    if served_by == "remote service":
        saga_type = "rec_remote_backlog"
        remote_queue = rig.env["REC_REMOTE_QUEUE"]
        env = {
            **rig.env,
            "IT_REMOTE_QUEUE": remote_queue,
            "IT_REMOTE_BROKER_URL": rig.env["SAGA_BROKER_URL"],
        }
        remote_log = rig.folder / "remote.log"
        remote = start_worker(
            "tests.fixtures.remote_service", env, remote_queue, remote_log, concurrency=1
        )
        rig.workers.insert(0, remote)  # stopped with the rig's workers
    context = {"runs_file": str(runs), "seconds": 0.3}
    if served_by == "saga worker":
        # The 40 first steps wait on their version's queue before the worker comes up (it
        # takes starts and steps from their queues in turn, so starts alone make no backlog).
        producer = Celery("blog-dispatch", broker=rig.env["SAGA_BROKER_URL"], set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        try:
            dispatcher = CeleryDispatcher(producer, Settings.from_env(rig.env), SIGNING_KEY)
            engine = engine_for(rig, dispatcher, clock_offset=timedelta(0))
            sagas = start_in_process(engine, saga_type, 40, **context)
        finally:
            producer.close()
        rig.start_worker(concurrency=1)
        rig.start_beat()
    else:
        rig.start_worker(concurrency=1)
        rig.start_beat()
        sagas = [rig.start_saga(saga_type, context, unique("blog")) for _ in range(40)]
    final = rig.wait_all(sagas, timeout=240)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}, Counter(
        s.state.value for s in final.values()
    )
    per_saga = Counter(line.split()[0] for line in runs.read_text().splitlines())
    assert set(per_saga) == set(sagas)
    twice = {saga_id: n for saga_id, n in per_saga.items() if n != 1}
    assert twice == {}, f"steps that ran more than once: {twice}"
    # The backlog was real: step messages waited past their start-by time and were re-sent.
    recovered = [
        saga_id
        for saga_id in sagas
        if any(r["event_type"] == "saga_recovered" for r in rig.store.audit_trail(saga_id))
    ]
    print(f"backlog ({served_by}): 40 starts, {len(recovered)} re-sent after their start-by time")
    assert recovered, "no step message waited past its start-by time: the test made no backlog"


def test_a_worker_clock_ahead_by_more_than_the_allowance_still_runs_each_step_once(
    rig: Rig,
) -> None:
    """Issue 14, item 6: one of two workers runs 3 s ahead (libfaketime), with a 1 s queue
    allowance. Copies the other worker sends look expired to it and are discarded; the sweep
    re-sends them with a doubled allowance until it covers the skew. Every saga completes and
    every step runs exactly once."""
    assert FAKETIME_LIB.exists(), "scripts/test.sh installs Debian's faketime"
    runs = rig.folder / "runs.txt"
    runs.touch()
    rig.start_worker(concurrency=1)
    ahead = {
        "LD_PRELOAD": str(FAKETIME_LIB),
        # A constant offset: the monotonic clock moves by it too, which changes no interval.
        # (FAKETIME_DONT_FAKE_MONOTONIC=1 would make time.sleep fail with EINVAL.)
        "FAKETIME": "+3s",
    }
    rig.env.update(ahead)
    try:
        skewed = rig.start_worker(concurrency=1)
    finally:
        for name in ahead:
            del rig.env[name]
    rig.start_beat()
    sagas = [
        rig.start_saga("rec_skew", {"runs_file": str(runs), "seconds": 0.05}, unique("skew"))
        for _ in range(12)
    ]
    final = rig.wait_all(sagas, timeout=120)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}, Counter(
        s.state.value for s in final.values()
    )
    per_step = Counter(tuple(line.split()[:2]) for line in runs.read_text().splitlines())
    assert set(per_step) == {(s, step) for s in sagas for step in ("first", "second")}
    assert [key for key, n in per_step.items() if n != 1] == []
    # The skew was real: the worker ahead discarded copies it saw as expired.
    discarded = count_lines([skewed.log_path], "Discarding revoked task")
    recovered = sum(
        1 for s in sagas for r in rig.store.audit_trail(s) if r["event_type"] == "saga_recovered"
    )
    print(f"skew +3 s: 12 sagas, {discarded} copies discarded, {recovered} re-sends, 0 twice")
    assert discarded > 0 and recovered > 0


def test_steps_queued_through_a_worker_outage_longer_than_the_grace_run_when_it_ends(
    database_url: str, broker_url: str, tmp_path: Path
) -> None:
    """Issue 14, item 6 (review): 10 sagas' first steps are sent while no worker runs, for 5 s
    with a 3 s queue allowance (a deploy). Every copy expires unstarted; the workers that
    come back discard them, report each discard, and the engine re-sends at once: the sagas
    finish in seconds, not after each step's 10 s timeout and a sweep."""
    rig = Rig.create(
        database_url,
        broker_url,
        tmp_path,
        SAGA_STALL_GRACE_SECONDS="3",
        SAGA_RECOVERY_INTERVAL_SECONDS=INTERVAL,
        REC_DEAD_QUEUE=unique("rec-dead"),
        REC_REMOTE_QUEUE=unique("rec-remote"),
    )
    producer = Celery("outage-dispatch", broker=broker_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    try:
        dispatcher = CeleryDispatcher(producer, Settings.from_env(rig.env), SIGNING_KEY)
        engine = engine_for(rig, dispatcher, clock_offset=timedelta(0))
        saga_ids = start_in_process(engine, "rec_quick", 10)
        time.sleep(5.0)  # the workers are down a little longer than the allowance
        back = time.monotonic()
        rig.start_worker()
        sagas = rig.wait_all(saga_ids, timeout=60)
        took = time.monotonic() - back
        assert {s.state.value for s in sagas.values()} == {"COMPLETED"}
        resent = recovered_rows(rig, saga_ids)
        reasons = {r["event_data"].get("reason") for rows in resent.values() for r in rows}
        assert reasons == {"expired"}, reasons  # no beat runs: the reports did it
        assert all(len(rows) == 1 for rows in resent.values()), resent
        print(f"\n[outage] 10 sagas, 5 s without workers (grace 3 s): done {took:.1f} s after")
        assert took < 8, took  # the step timeout is 10 s: no saga waited for a deadline
    finally:
        producer.close()
        rig.close()
