"""Migration (issue 15, item 3): a saga in flight moves to another version under a step map.

Through the engine on the in-memory store, and `saga-worker migrate` on SQLite in a temp dir.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from saga_worker import registry
from saga_worker.audit.redaction import Redactor
from saga_worker.cli import main
from saga_worker.cli._output import EXIT_REFUSED, EXIT_USAGE
from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import (
    MigrateRequested,
    StartRequested,
    StepFailed,
    StepSucceeded,
)
from saga_worker.core.migration import OutlineStep, Shape, migrate
from saga_worker.core.model import Direction, SagaState
from saga_worker.engine import SagaEngine
from saga_worker.errors import InvalidRequest, UnknownDefinitionVersion
from saga_worker.requests import parse_migrate
from saga_worker.store.connect import create_db_engine
from saga_worker.store.migrate import upgrade
from saga_worker.store.repository import SagaStore
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher

LIMITS = Limits(stall_grace_seconds=1)


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def define(saga_type: str, version: str, steps: str, default: bool = False) -> SagaDefinition:
    """`steps` like "a b- c": a name per step, `-` for one without a compensation."""
    return SagaDefinition(
        saga_type,
        [
            Step(n.rstrip("-"), noop, compensate=None if n.endswith("-") else noop)
            for n in steps.split()
        ],
        version=version,
        default=default,
    )


class World:
    """An engine over the in-memory store with its own versions of one saga type."""

    def __init__(self, *definitions: SagaDefinition) -> None:
        self.clock = FakeClock()
        self.store = InMemoryStore()
        self.dispatcher = RecordingDispatcher()
        self.versions = {d.version: d for d in definitions}

        def lookup(saga_type: str, version: str | None) -> SagaDefinition:
            if version is None:  # new starts use the first
                return definitions[0]
            if version not in self.versions:
                raise UnknownDefinitionVersion(saga_type, str(version), list(self.versions))
            return self.versions[version]

        self.engine = SagaEngine(
            self.store, self.dispatcher, LIMITS, clock=self.clock, definitions=lookup
        )

    def start(self, saga_id: str = "s") -> None:
        saga_type = next(iter(self.versions.values())).saga_type
        self.engine.start(StartRequested(saga_id, saga_type, {"order": 7}, user_id="u"))

    def succeed(self, saga_id: str = "s") -> None:
        pending = self.saga(saga_id).pending
        assert pending is not None
        index, direction, number = pending.key()
        self.engine.handle(saga_id, StepSucceeded(index, direction, number, {}))

    def fail(self, saga_id: str = "s") -> None:
        pending = self.saga(saga_id).pending
        assert pending is not None
        index, direction, number = pending.key()
        self.engine.handle(
            saga_id, StepFailed(index, direction, number, "E", "no", retryable=False)
        )

    def saga(self, saga_id: str = "s") -> Any:
        saga = self.store.load(saga_id)
        assert saga is not None
        return saga

    def migrate(self, to: str, saga_id: str = "s", **mapping: str) -> Any:
        saga = self.saga(saga_id)
        shape = Shape.of(self.versions[saga.definition_version], saga.definition_version)
        request = MigrateRequested(mapping, "ops@example", "deploy 42")
        return self.engine.migrate(saga_id, self.versions[to], shape, request)


# -- the engine path --------------------------------------------------------------------


def test_a_stalled_saga_moves_to_the_new_version_and_resumes_under_a_fresh_attempt() -> None:
    world = World(define("pay", "1", "a b c"), define("pay", "2", "a b2 x c"))
    world.start()
    world.succeed()
    world.clock.advance(3600)  # step b's attempt stalled: no worker has version 1 any more
    before = world.saga()
    sent = len(world.dispatcher.sent)

    outcome = world.migrate("2", b="b2")

    assert outcome.ignored is None
    saga = world.saga()
    assert (saga.definition_version, saga.total_steps, saga.state) == ("2", 4, SagaState.RUNNING)
    assert saga.completed_steps == ("a",) and saga.context == {"order": 7}
    pending = saga.pending
    assert (pending.step_index, pending.direction) == (1, Direction.FORWARD)
    assert pending.number == before.attempt_seq + 1 == saga.attempt_seq
    assert pending.uncertain  # the old attempt was sent: it may have run
    # Sent after the commit, under the new definition and to its version's queue.
    (out,) = world.dispatcher.sent[sent:]
    assert out.step_name == "b2" and out.saga.definition_version == "2"
    assert out.key == pending.key()
    rows = world.store.audit_trail("s")
    migrated, started = rows[-2:]
    assert migrated["event_type"] == "saga_migrated" and started["event_type"] == "step_start"
    assert migrated["user_id"] == started["user_id"] == "ops@example"
    assert migrated["event_data"] == {
        "from_version": "1",
        "to_version": "2",
        "map": {"b": "b2"},
        "reason": "deploy 42",
        "resume_step": "b2",
        "direction": "forward",
        "steps": [["a", True], ["b2", True], ["x", True], ["c", True]],
    }
    assert migrated["context_snapshot"] == {"order": 7}
    assert world.store.verify_audit() == []
    # The old attempt's late result is a stale message now.
    late = world.engine.handle("s", StepSucceeded(1, Direction.FORWARD, before.pending.number, {}))
    assert late.ignored is not None
    # The saga runs on under version 2: b2, then the new step x, then c.
    for _ in range(3):
        world.succeed()
    assert world.saga().state is SagaState.COMPLETED
    assert world.saga().completed_steps == ("a", "b2", "x", "c")


def test_a_rolling_back_saga_moves_and_undoes_every_completed_step() -> None:
    world = World(define("undo", "1", "a b c d"), define("undo", "2", "a bb c d"))
    world.start()
    for _ in range(3):
        world.succeed()
    world.fail()  # d failed for good: c, then b, then a are compensated
    world.succeed()  # c compensated
    world.clock.advance(3600)
    seq = world.saga().attempt_seq

    outcome = world.migrate("2", b="bb")

    assert outcome.ignored is None
    saga = world.saga()
    assert saga.state is SagaState.COMPENSATING
    assert saga.completed_steps == ("a", "bb", "c") and saga.compensated_steps == ("c",)
    assert saga.pending.key() == (1, Direction.COMPENSATE, seq + 1)
    world.succeed()
    # The rest of the rollback numbers its attempts above every one issued before.
    assert world.saga().pending.key() == (0, Direction.COMPENSATE, seq + 2)
    world.succeed()
    assert world.saga().state is SagaState.COMPENSATED
    assert world.saga().compensated_steps == ("c", "bb", "a")


def test_a_dry_run_decides_but_writes_and_sends_nothing() -> None:
    world = World(define("dry", "1", "a b"), define("dry", "2", "a b c"))
    world.start()
    world.clock.advance(3600)
    before, rows, sent = world.saga(), len(world.store.audit_trail("s")), world.dispatcher.sent
    saga = world.saga()
    outcome = world.engine.migrate(
        "s",
        world.versions["2"],
        Shape.of(world.versions["1"], "1"),
        MigrateRequested(),
        dry_run=True,
    )
    assert outcome.ignored is None and outcome.decision.saga.definition_version == "2"
    assert world.saga() == before == saga and world.dispatcher.sent == sent
    assert len(world.store.audit_trail("s")) == rows


@pytest.mark.parametrize(
    ("target", "mapping", "says"),
    [
        ("x a b", {}, "step(s) x of version 2 would be skipped"),
        (
            "b a",
            {},
            "step(s) b of version 2 would be skipped: they come before completed step(s) a",
        ),
        ("a- b", {}, "would skip the compensation of a"),
        ("z b", {}, "step a ran and has no step in version 2: map it with --map a=STEP"),
        ("z b", {"q": "z"}, "--map q=z: version 1 has no step q"),
        ("z b", {"a": "y"}, "--map a=y: version 2 has no step y"),
        ("z b", {"a": "b"}, "steps a and b would both become b"),
        ("a", {}, "every step of version 2 is completed already"),
        ("a c", {}, "the pending attempt of step b may have run"),
    ],
)
def test_a_migration_that_would_skip_or_rerun_is_refused_saying_what_to_fix(
    target: str, mapping: dict[str, str], says: str
) -> None:
    world = World(define("ref", "1", "a b"), define("ref", "2", target))
    world.start()
    world.succeed()
    world.clock.advance(3600)
    before = world.saga()
    outcome = world.migrate("2", **mapping)
    assert outcome.ignored is not None and says in outcome.ignored, outcome.ignored
    assert outcome.ignored.startswith("cannot migrate saga s to version 2: ")
    assert world.saga() == before


def test_completed_steps_in_another_order_are_refused() -> None:
    world = World(define("ord", "1", "a b c"), define("ord", "2", "b a c"))
    world.start()
    world.succeed()
    world.succeed()
    world.clock.advance(3600)
    refused = world.migrate("2").ignored
    assert refused is not None and "completed steps a, b would be in another order" in refused


def test_ended_in_flight_and_same_version_sagas_are_refused() -> None:
    world = World(define("end", "1", "a"), define("end", "2", "a"))
    world.start()
    assert "is in flight until" in world.migrate("2").ignored  # inside its deadline
    assert "already runs version 1" in world.migrate("1").ignored
    world.succeed()
    assert "it is COMPLETED" in world.migrate("2").ignored


def test_the_outline_of_a_version_comes_from_the_audit_rows_latest_first() -> None:
    rows = [
        {"event_type": "saga_start", "event_data": {"definition_version": "1", "steps": []}},
        {"event_type": "step_start", "event_data": {"attempt": 1}},
        {
            "event_type": "saga_migrated",
            "event_data": {"to_version": "2", "steps": [{"name": "a", "compensate": True}]},
        },
    ]
    assert Shape.from_audit(rows, "2") == Shape("2", (OutlineStep("a", True),))
    assert Shape.from_audit(rows, "1") == Shape("1", ())
    assert Shape.from_audit(rows, None) is None  # before versions: no outline recorded
    assert Shape.from_audit([{"event_type": "saga_start", "event_data": None}], "1") is None


def test_a_migration_refused_for_a_stale_outline() -> None:
    """Another migration moved the saga between reading its outline and deciding."""
    world = World(define("st", "1", "a b"), define("st", "2", "a b c"))
    world.start()
    world.clock.advance(3600)
    saga = world.saga()
    stale = Shape("0", (OutlineStep("a", True), OutlineStep("b", True)))
    decision = migrate(world.versions["2"], saga, stale, MigrateRequested(), world.clock())
    assert decision.ignored is not None and "it runs version 1, not 0" in decision.ignored


def test_the_map_of_a_request_is_checked() -> None:
    request = parse_migrate("op", "why", ["a=b", " c = d "])
    assert request.mapping == {"a": "b", "c": "d"} and request.user_id == "op"
    for bad in (["a"], ["=b"], ["a=b", "a=c"], "a=b"):
        with pytest.raises(InvalidRequest, match="map"):
            parse_migrate("op", "why", bad)
    with pytest.raises(InvalidRequest, match="user_id"):
        parse_migrate(None, "why", [])


# -- the command line, on SQLite --------------------------------------------------------


class Cli:
    """`saga-worker` against a SQLite file, sagas started through the same store."""

    def __init__(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'saga.db'}"
        db = create_db_engine(url, pool=False)
        upgrade(db)
        db.dispose()
        self.settings = Settings.from_env({"SAGA_HOME": str(tmp_path), "SAGA_DATABASE_URL": url})
        self.clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
        self.dispatcher = RecordingDispatcher()
        self.saga_type = f"cli_{uuid.uuid4().hex[:8]}"
        self.v1 = registry.register(define(self.saga_type, "1", "a b", default=True))
        self.v2 = registry.register(define(self.saga_type, "2", "a bb c"))
        self.store = SagaStore(create_db_engine(url, pool=False), Redactor(()))
        self.engine = SagaEngine(self.store, self.dispatcher, LIMITS, clock=self.clock)

    def start(self, saga_id: str, completed: int = 1) -> None:
        self.engine.start(StartRequested(saga_id, self.saga_type, {"n": 1}))
        for _ in range(completed):
            saga = self.store.load(saga_id)
            assert saga is not None and saga.pending is not None
            self.engine.handle(saga_id, StepSucceeded(*saga.pending.key(), output={}))

    def run(self, *args: str) -> Any:
        def client() -> SagaClient:
            return SagaClient(self.settings, dispatcher=self.dispatcher, clock=self.clock)

        return CliRunner().invoke(main, ["migrate", *args], obj=client)


def test_cli_migrates_one_saga_and_prints_json(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    cli.start("one")
    cli.clock.advance(3600)
    result = cli.run("one", "--to", "2", "--map", "b=bb", "--user", "ana", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["migrated"] and (data["from_version"], data["to_version"]) == ("1", "2")
    assert (data["resume_step"], data["direction"]) == ("bb", "forward")
    saga = cli.store.load("one")
    assert saga is not None and saga.definition_version == "2"
    row = cli.store.audit_trail("one")[-2]
    assert row["event_type"] == "saga_migrated" and row["user_id"] == "ana"
    assert row["event_data"]["reason"].startswith("operator migration (from ")
    assert cli.dispatcher.sent[-1].saga.definition_version == "2"
    # A later migration reads version 2's outline from this row, even with its code gone.
    assert Shape.from_audit(cli.store.shape_rows("one"), "2") == Shape.of(cli.v2, "2")
    # Once more: it runs version 2 already.
    again = cli.run("one", "--to", "2", "--json")
    assert again.exit_code == EXIT_REFUSED
    assert json.loads(again.stdout)["error"]["code"] == "migration_refused"
    assert "already runs version 2" in again.stderr


def test_cli_batch_streams_a_version_lists_refusals_and_exits_4(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    for i in range(3):
        cli.start(f"ok-{i}")
    cli.start("none-done", completed=0)  # a's attempt pending: fine too
    cli.start("done", completed=2)  # COMPLETED: not in flight, not listed
    cli.clock.advance(3600)
    # Version 2 has no step b: each saga whose step b is pending may have run it.
    args = ["--type", cli.saga_type, "--from", "1", "--to", "2"]

    dry = cli.run(*args, "--map", "b=bb", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would migrate 4 saga(s), refused 0" in dry.stdout
    assert "ok-0  RUNNING  1 -> 2  would resume at bb (forward" in dry.stdout
    assert all(cli.store.load(f"ok-{i}").definition_version == "1" for i in range(3))  # type: ignore[union-attr]

    refused = cli.run(*args, "--json")  # without the map: b has no step in version 2
    assert refused.exit_code == EXIT_REFUSED
    report = json.loads(refused.stdout)
    assert (report["migrated"], report["refused"]) == (1, 3)
    reasons = {r["saga_id"]: r["refused"] for r in report["results"]}
    assert reasons["none-done"] is None  # nothing completed: it starts over at a
    assert "pending attempt of step b may have run" in reasons["ok-0"]

    moved = cli.run(*args, "--map", "b=bb")
    assert moved.exit_code == 0, moved.output
    assert "migrated 3 saga(s), refused 0" in moved.stdout
    assert {cli.store.load(f"ok-{i}").definition_version for i in range(3)} == {"2"}  # type: ignore[union-attr]


def test_cli_usage_errors(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    cli.start("u")
    assert cli.run("--to", "2").exit_code == EXIT_USAGE
    assert cli.run("u", "--type", cli.saga_type, "--from", "1", "--to", "2").exit_code == (
        EXIT_USAGE
    )
    bad_map = cli.run("u", "--to", "2", "--map", "b")
    assert bad_map.exit_code == EXIT_USAGE and "OLD=NEW" in bad_map.stderr
    unknown = cli.run("u", "--to", "9")
    assert unknown.exit_code == 5 and "version '9' is not registered" in unknown.stderr
