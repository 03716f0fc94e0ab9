"""Garbage, malformed and hostile messages next to good ones: refused, audited, nothing wedges."""

from __future__ import annotations

import json
import pickle
import uuid
import zlib
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Queue

from saga_worker.tokens import attempt_token
from tests.waiting import as_logged, wait_for, wait_for_tasks

from .conftest import SIGNING_KEY, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("stack", ["postgres"], indirect=True),
]

SAGA_TYPE = "backtest_workflow"


def _valid_id(prefix: str = "fz") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


BASE: dict[str, Any] = {"saga_type": SAGA_TYPE, "context": {"strategy_id": 1}}
# Values of the wrong JSON type for a field that wants a string (saga_type) or an object
# (context); a string is a wrong type for context and an unknown name for saga_type.
WRONG_TYPES: list[tuple[str, Any]] = [
    ("null", None),
    ("bool", True),
    ("int", 5),
    ("big_int", 2**70),
    ("empty_str", ""),
    ("str", "not an object"),
    ("list", [1, 2, 3]),
]


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


# Each bad start breaks exactly one rule, with a usable saga_id (so the rejection is audited
# under it): (case, the field the error must name, kwargs, positional args).
BAD_STARTS: list[tuple[str, str, dict[str, Any], tuple[Any, ...]]] = [
    ("saga_type-unknown", "saga_type", {**BASE, "saga_type": "no_such_saga"}, ()),
    *[
        (f"saga_type-{name}", "saga_type", {"saga_type": value, "context": {}}, ())
        for name, value in WRONG_TYPES
    ],
    *[
        (f"context-{name}", "context", {"saga_type": SAGA_TYPE, "context": value}, ())
        for name, value in WRONG_TYPES
    ],
    ("context-missing", "context", {"saga_type": SAGA_TYPE}, ()),
    # over SAGA_MAX_CONTEXT_BYTES (256 KiB)
    ("context-too_large", "context", {**BASE, "context": {"blob": "x" * 300_000}}, ()),
    # deeper than SAGA_MAX_CONTEXT_DEPTH (32)
    ("context-depth_33", "context", {"saga_type": SAGA_TYPE, "context": _nest(33)}, ()),
    ("context-depth_60", "context", {"saga_type": SAGA_TYPE, "context": _nest(60)}, ()),
    *[
        (f"ip_address-{value!r}", "ip_address", {**BASE, "ip_address": value}, ())
        for value in ["999.1.1.1", "1.2.3", "::g", "localhost", "1.2.3.4; DROP", "", 1234]
    ],
    *[
        (f"user_id-{name}", "user_id", {**BASE, "user_id": value}, ())
        for name, value in [("int", 7), ("empty", ""), ("300_chars", "x" * 300), ("nul", "a\x00b")]
    ],
    # NUL and other control characters, which PostgreSQL cannot store or which garble logs
    ("context-nul_string", "context", {**BASE, "context": {"s": "\x00nul-in-json"}}, ()),
    ("context-nul_key", "context", {**BASE, "context": {"k\x00": 1}}, ()),
    ("saga_type-escape", "saga_type", {**BASE, "saga_type": "x\x1b[2J"}, ()),
    ("ip_address-nul_scope", "ip_address", {**BASE, "ip_address": "fe80::1%a\x00"}, ()),
    *[
        (f"unknown_argument-{name}", name, {**BASE, name: "boom"}, ())
        for name in ["evil", "__class__", "saga_typo"]
    ],
    ("positional_args", "args", BASE, (1, "x")),
]

# saga_ids that cannot name a saga: refused with nothing recorded under any id.
BAD_SAGA_IDS: list[Any] = [
    "",
    "a b",
    "x/y",
    "it's",
    'say "hi"',
    "a;b",
    "x" * 256,
    "é-unicode",
    12345,
]


def _rejection_rows(stack: Stack, saga_id: str, what: str) -> list[dict[str, Any]]:
    """The audit rows of a rejected start, once there are any."""
    return wait_for(
        lambda: stack.store.audit_trail(saga_id),
        60,
        f"the rejection of {what} ({saga_id})",
        details=lambda: stack.workers[0].log_tail(200),
    )


def test_bad_starts_are_rejected_and_good_sagas_still_complete(stack: Stack) -> None:
    """Every rule a start can break, one bad start each, interleaved with good sagas on one
    worker: each is rejected naming its field, nothing wedges, the good ones complete."""
    expected: dict[str, tuple[str, str]] = {}
    good: list[str] = []
    for n, (case, field, kwargs, args) in enumerate(BAD_STARTS):
        saga_id = _valid_id("bad")
        expected[saga_id] = (case, field)
        stack.producer.send_task(
            "saga.start", args=args, kwargs={**kwargs, "saga_id": saga_id}, queue=stack.queue
        )
        if n % 6 == 5:
            good.append(stack.start(SAGA_TYPE, {"strategy_id": len(good)}))
    unnamed: dict[str, Any] = {}  # task id -> bad saga_id
    for saga_id in BAD_SAGA_IDS:
        task_id = uuid.uuid4().hex
        unnamed[task_id] = saga_id
        stack.producer.send_task(
            "saga.start", kwargs={**BASE, "saga_id": saga_id}, queue=stack.queue, task_id=task_id
        )
    good.append(stack.start(SAGA_TYPE, {"strategy_id": 99}))
    final = stack.wait_all(good, timeout=120)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}
    for saga_id, (case, field) in expected.items():
        rows = _rejection_rows(stack, saga_id, case)
        assert [r["event_type"] for r in rows] == ["saga_rejected"], (case, rows)
        assert field in rows[0]["error_message"], (case, rows[0]["error_message"])
        assert stack.store.load(saga_id) is None, case
    # The starts with unusable ids ran to their end, then: nothing under the id, nor under
    # the message's task id (which a start without a saga_id would take).
    wait_for_tasks(stack.worker_logs(), unnamed)
    for task_id, saga_id in unnamed.items():
        for name in (saga_id, task_id) if isinstance(saga_id, str) and saga_id else (task_id,):
            assert stack.store.load(name) is None, repr(saga_id)
            assert stack.store.audit_trail(name) == [], repr(saga_id)


def _publish_raw(stack: Stack, body: bytes | str, content_type: str, task: str) -> str:
    """Publish a message as anyone with write access to the broker could; returns its id."""
    task_id = str(uuid.uuid4())
    with Connection(stack.broker_url) as conn:
        conn.Producer().publish(
            body,
            routing_key=stack.queue,
            exchange="",
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            headers={"task": task, "id": task_id, "lang": "py"},
            declare=[Queue(stack.queue)],
        )
    return task_id


def test_malformed_broker_messages_are_refused_and_the_queue_keeps_moving(stack: Stack) -> None:
    worker = stack.workers[0]
    marker = _valid_id("pickled")
    payload = pickle.dumps(
        ((), {"saga_type": SAGA_TYPE, "context": {"strategy_id": 1}, "saga_id": marker}, {})
    )
    pickled = _publish_raw(stack, payload, "application/x-python-serialize", "saga.start")
    _publish_raw(stack, "saga_type: x\n", "application/x-yaml", "saga.start")
    _publish_raw(stack, "{not json", "application/json", "saga.start")
    _publish_raw(stack, json.dumps([[], {}, {}]), "application/json", "no.such.task")
    _publish_raw(stack, json.dumps({"not": "a list"}), "application/json", "saga.start")
    _publish_raw(stack, json.dumps([[1, 2], "kwargs?", None]), "application/json", "saga.advance")
    _publish_raw(
        stack, json.dumps([[], {"blob": "y" * 3_000_000}, {}]), "application/json", "saga.start"
    )
    # Not even a kombu envelope: raw garbage pushed onto the Redis list.
    client = redis.Redis.from_url(stack.broker_url)
    client.lpush(stack.queue, b"\x00\xffgarbage", b"{}", b'{"body": 5}')
    good = [stack.start(SAGA_TYPE, {"strategy_id": i}) for i in range(5)]
    final = stack.wait_all(good, timeout=90)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}
    assert worker.process.poll() is None, worker.log_tail()
    log = worker.log_path.read_text(errors="replace")
    # The pickle was refused (logged) before it could become a task: it never ran.
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log
    assert f"[{as_logged(pickled)}] received" not in log
    assert stack.store.load(marker) is None
    assert "no.such.task" in log


def test_hostile_strings_are_stored_verbatim_never_executed(stack: Stack) -> None:
    hostile = {
        "strategy_id": 8,
        "note'); DROP TABLE saga_checkpoints;--": "1' OR '1'='1",
        "ünïcödé 🚀": ["\u202e", "tab\tand\nnewline", "你好", "a" * 5000],
        "$where": {"$gt": ""},
    }
    user = "robert'); DROP TABLE saga_audit_logs;-- ✓"
    saga_id = _valid_id("host") + ":._-"
    stack.start(SAGA_TYPE, hostile, saga_id=saga_id, user_id=user, ip_address="::ffff:10.0.0.1")
    saga = stack.wait(saga_id)
    assert saga.state.value == "COMPLETED"
    for key, value in hostile.items():
        assert saga.context[key] == value
    assert saga.user_id == user
    assert saga.ip_address == "::ffff:10.0.0.1"
    rows = stack.store.audit_trail(saga_id)
    assert rows[0]["user_id"] == user
    assert rows[0]["context_snapshot"]["ünïcödé 🚀"] == hostile["ünïcödé 🚀"]
    stack.assert_chain_ok(saga_id)
    # SQL metacharacters in saga_id itself are outside the allowed charset: rejected.
    evil_id = "x'; DELETE FROM saga_checkpoints;--"
    evil = stack.send("saga.start", {**BASE, "saga_id": evil_id})
    ok = stack.start(SAGA_TYPE, {"strategy_id": 2})
    assert stack.wait(ok).state.value == "COMPLETED"
    wait_for_tasks(stack.worker_logs(), [evil])
    assert stack.store.load(evil_id) is None
    assert stack.store.load(evil) is None
    assert stack.store.load(saga_id) is not None  # tables intact


def test_forged_advance_changes_nothing_and_writes_nothing(stack: Stack) -> None:
    # a saga parked on a slow step, so that it has a pending attempt to forge against
    victim = stack.start(
        SAGA_TYPE, {"strategy_id": 3, "slow_step": {"step": "run_strategy", "seconds": 4}}
    )
    other = stack.start(SAGA_TYPE, {"strategy_id": 4})
    stack.wait(other)
    stack.wait_for_step(victim, 1)
    key = SIGNING_KEY
    base = {
        "saga_id": victim,
        "direction": "forward",
        "outcome": "success",
        "output": {"results": "forged"},
    }
    forged = [
        {**base, "step_index": 1, "attempt": 1, "token": "f" * 64},  # wrong token
        {
            **base,
            "step_index": 0,
            "attempt": 1,  # replay of an earlier attempt's token
            "token": attempt_token(key, victim, 0, "forward", 1),
        },
        {
            **base,
            "step_index": 1,
            "attempt": 1,  # token of another saga
            "token": attempt_token(key, other, 1, "forward", 1),
        },
    ]
    sent = [stack.send("saga.advance", kwargs) for kwargs in forged]
    saga = stack.wait(victim, timeout=60)
    wait_for_tasks(stack.worker_logs(), sent)
    assert saga.state.value == "COMPLETED"
    assert saga.context["results"] != "forged"
    rows = stack.store.audit_trail(victim)
    # Neither forged tokens nor a replayed genuine one are audited (issue 14): they are
    # logged and counted in saga_rejected_total.
    assert [r for r in rows if r["event_type"] == "saga_rejected"] == []
    assert [r["step_name"] for r in rows if r["event_type"] == "step_complete"] == [
        "create_backtest",
        "run_strategy",
        "save_results",
    ]
    stack.assert_chain_ok(victim)


def test_headers_celery_reads_later_and_compression_bombs_are_refused(stack: Stack) -> None:
    """Headers Celery trusts after the task handler returned: a `timelimit` of strings
    stopped the worker, a number or a numeric `stamped_headers` wedged a pool slot; a
    gzip body expanded a thousandfold in the worker's main process."""
    worker = stack.workers[0]
    pid = worker.process.pid
    markers = []
    cases: list[tuple[dict[str, Any], bytes]] = [
        ({"timelimit": ["x", "y"]}, b""),
        ({"timelimit": 5}, b""),
        ({"stamped_headers": 5, "stamps": "x"}, b""),
        ({"retries": "many"}, b""),
        ({"compression": "application/x-gzip"}, zlib.compress(b"\0" * 100_000_000, 9)),
    ]
    named: list[str] = []  # ids of the messages whose drop or end names them
    compressed = 0  # dropped by the transport, which names the queue only
    log_start = worker.log_path.stat().st_size
    # More hostile messages than the worker has pool slots: a leaked slot shows.
    with Connection(stack.broker_url) as conn:
        producer = conn.Producer()
        for extra, body in cases * 2:
            marker = _valid_id("hdr")
            markers.append(marker)
            message_id = str(uuid.uuid4())
            if "compression" in extra:
                compressed += 1
            else:
                named.append(as_logged(message_id))
            kwargs = {"saga_type": SAGA_TYPE, "context": {"strategy_id": 1}, "saga_id": marker}
            producer.publish(
                body or json.dumps([[], kwargs, {}]).encode(),
                routing_key=stack.queue,
                exchange="",
                content_type="application/json",
                content_encoding="utf-8",
                headers={"task": "saga.start", "id": message_id, "lang": "py", **extra},
                declare=[Queue(stack.queue)],
            )
    good = [stack.start(SAGA_TYPE, {"strategy_id": i}) for i in range(4)]
    final = stack.wait_all(good, timeout=90)
    assert {s.state.value for s in final.values()} == {"COMPLETED"}
    assert worker.process.poll() is None and worker.process.pid == pid, worker.log_tail()

    def new_lines() -> list[str]:
        with worker.log_path.open("rb") as log:
            log.seek(log_start)
            return log.read().decode(errors="replace").splitlines()

    # Each hostile message was dealt with: a line other than "received" names it (its drop,
    # or the end of the task it became), or the transport logged dropping a compressed one.
    def undealt() -> list[str]:
        lines = new_lines()
        dealt = {i for line in lines if not line.endswith("received") for i in named if i in line}
        bombs = sum("compressed message refused" in line for line in lines)
        return [i for i in named if i not in dealt] + ["gzip"] * (compressed - bombs)

    wait_for(
        lambda: not undealt(),
        30,
        "every hostile message to be dealt with",
        details=lambda: f"{undealt()}\n{worker.log_tail(100)}",
    )
    for marker in markers:
        assert stack.store.load(marker) is None
        assert stack.store.audit_trail(marker) == []
    log = worker.log_path.read_text(errors="replace")
    assert "Unrecoverable error" not in log


def _publish_start(stack: Stack, kwargs: dict[str, Any]) -> None:
    # json.dumps escapes a lone surrogate as \ud800, which is valid JSON (not valid UTF-8)
    _publish_raw(stack, json.dumps([[], kwargs, {}]), "application/json", "saga.start")


def test_lone_surrogates_in_a_start_are_rejected_and_recorded(stack: Stack) -> None:
    ids = []
    for field, context in [
        ("context", {"strategy_id": 1, "note": "\ud800"}),
        ("context", {"strategy_id": 1, "k\udfff": 1}),
        ("context", {"strategy_id": 1, "deep": [{"x": ["ok", "\udc80"]}]}),
        ("user_id", None),
        ("saga_type", None),
        ("k\\ud800", None),  # an unknown argument, named (escaped) in the reason
    ]:
        saga_id = _valid_id("surr")
        kwargs: dict[str, Any] = {"saga_type": SAGA_TYPE, "context": context, "saga_id": saga_id}
        if field == "user_id":
            kwargs.update(context={"strategy_id": 1}, user_id="bob\ud800")
        if field == "saga_type":
            kwargs.update(context={"strategy_id": 1}, saga_type="x\ud800")
        if field.startswith("k"):
            kwargs.update(context={"strategy_id": 1}, **{"k\ud800": 1})
        _publish_start(stack, kwargs)
        ids.append((saga_id, field))
    good = stack.start(SAGA_TYPE, {"strategy_id": 2})
    assert stack.wait(good).state.value == "COMPLETED"
    for saga_id, field in ids:
        rows = _rejection_rows(stack, saga_id, field)
        assert [r["event_type"] for r in rows] == ["saga_rejected"], rows
        message = rows[0]["error_message"]
        assert message.startswith(field), message
        assert "UTF-8" in message or "unknown argument" in message, message
        # the refused context is not kept; a usable one is, whatever else was refused
        assert (rows[0]["context_snapshot"] in (None, {})) == (field == "context"), rows[0]
        assert stack.store.load(saga_id) is None
    assert "UnicodeEncodeError" not in stack.workers[0].log_path.read_text(errors="replace")


def _parked_remote_sagas(stack: Stack, count: int) -> list[str]:
    """Sagas whose remote quote (step 1) attempt 1 stays pending for a few seconds."""
    ids = [stack.start("it_remote", {"qty": 5, "remote_sleep": 4}) for _ in range(count)]
    for saga_id in ids:
        stack.wait_for_step(saga_id, 1)
    return ids


def _advance(stack: Stack, saga_id: str, **fields: Any) -> None:
    key = SIGNING_KEY
    body = {
        "saga_id": saga_id,
        "step_index": 1,
        "direction": "forward",
        "attempt": 1,
        "token": attempt_token(key, saga_id, 1, "forward", 1),
        "outcome": "success",
        **fields,
    }
    # raw, so that 10**400, Infinity and NaN reach the worker exactly as JSON can carry them
    _publish_raw(stack, json.dumps([[], body, {}]), "application/json", "saga.advance")


def test_remote_output_with_a_lone_surrogate_is_a_failed_attempt(stack: Stack) -> None:
    value, key = _parked_remote_sagas(stack, 2)
    _advance(stack, value, output={"price": 1, "quoted_by": "\ud800"})
    _advance(stack, key, output={"price": 1, "q\udfff": [1]})
    for saga_id in (value, key):
        saga = stack.wait(saga_id, timeout=60)
        assert saga.state.value == "COMPLETED", saga.error
        assert saga.context["quoted_by"] == "it_pricing"  # attempt 2, from the remote service
        rows = stack.store.audit_trail(saga_id)
        retried = [r for r in rows if r["event_type"] == "step_retry"]
        assert len(retried) == 1, [(r["event_type"], r["error_message"]) for r in rows]
        assert retried[0]["step_name"] == "quote"
        assert "step output" in retried[0]["error_message"]
        assert "UTF-8" in retried[0]["error_message"]
        stack.assert_chain_ok(saga_id)


@pytest.mark.parametrize(
    "duration",
    [10**400, float("inf"), float("nan"), -1, True],
    ids=["10**400", "inf", "nan", "-1", "True"],
)
def test_unusable_durations_are_ignored_and_the_result_applies(stack: Stack, duration: Any) -> None:
    (saga_id,) = _parked_remote_sagas(stack, 1)
    _advance(stack, saga_id, output={"price": 7, "quoted_by": "advance"}, duration_ms=duration)
    saga = stack.wait(saga_id, timeout=60)
    assert saga.state.value == "COMPLETED", saga.error
    assert saga.context["quoted_by"] == "advance"  # the sent result, not the remote's later one
    rows = stack.store.audit_trail(saga_id)
    done = [r for r in rows if r["event_type"] == "step_complete" and r["step_name"] == "quote"]
    assert len(done) == 1
    assert done[0]["duration_ms"] is None
