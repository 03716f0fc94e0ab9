"""Hypothesis fuzz of raw items on a Redis queue, through the guarded transport (issue 14).

Anyone who can write to the broker can push anything onto the saga queue's list. Each item
here is pushed onto a list that a kombu consumer reads through saga_worker's Redis transport
(worker/broker.py), with Celery's task handler wrapped by the worker's GuardedConsumer
(worker/consumer.py) and the body check of GuardedTask (worker/guard.py). The property: nothing
but the expected timeout leaves `drain_events`, and every item is either delivered as a
well-formed task message or logged and dropped exactly once, leaving nothing on the list or
in the unacked bookkeeping.

The Redis server is the test command's (SAGA_TEST_BROKER_URL): the transport talks RESP over a
real socket, as in a worker. fakeredis' TCP server was tried as a stand-in for bare `pytest`
runs; it was twenty times slower and dropped connections under load, so a bare run skips.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import pickle
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery.exceptions import InvalidTaskError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.connection import Connection
from kombu.entity import Queue

from saga_worker.worker.broker import TRANSPORT_PATH
from saga_worker.worker.consumer import GuardedConsumer
from saga_worker.worker.guard import payload_problem
from tests.requirements import unavailable

QUEUE = "fuzz-saga"
REAL_REDIS = os.environ.get("SAGA_TEST_BROKER_URL", "").startswith("redis://")
TASK = "saga.start"
GOOD_BODY = [[], {"saga_type": "backtest_workflow", "context": {"strategy_id": 1}}, {}]


@pytest.fixture(scope="module")
def redis_url() -> str:
    """The test command's Redis, on a database of its own: workers of the integration tests
    use database 0, and kombu's unacked hash has one name per database, so a database of our
    own keeps the bookkeeping checks exact."""
    if not REAL_REDIS:
        unavailable("SAGA_TEST_BROKER_URL (a redis:// URL) is not set: run scripts/test.sh")
    return os.environ["SAGA_TEST_BROKER_URL"].rsplit("/", 1)[0] + "/13"


@pytest.fixture(scope="module")
def template(redis_url: str) -> dict[str, Any]:
    """A real kombu envelope of a task message, as the transport writes it to the list."""
    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    with Connection(redis_url, transport=TRANSPORT_PATH) as conn:
        conn.Producer().publish(
            json.dumps(GOOD_BODY),
            routing_key=scratch,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": TASK, "id": "template", "lang": "py"},
            declare=[Queue(scratch)],
        )
    client = redis.Redis.from_url(redis_url)
    raw = client.rpop(scratch)
    client.close()
    assert isinstance(raw, bytes)
    envelope = json.loads(raw)
    assert isinstance(envelope, dict)
    return envelope


# -- what anyone can push -------------------------------------------------------------------

HEADER_NAMES = [
    "task", "id", "lang", "compression", "timelimit", "stamped_headers", "stamps", "retries",
    "eta", "expires", "argsrepr", "kwargsrepr", "root_id", "parent_id", "group",
    "group_index", "shadow", "origin", "ignore_result", "replaced_task_nesting", "redelivered",
]  # fmt: skip
PATHS: list[tuple[str, ...]] = [
    ("body",),
    ("content-type",),
    ("content-encoding",),
    ("headers",),
    ("properties",),
    ("properties", "delivery_tag"),
    ("properties", "delivery_info"),
    ("properties", "body_encoding"),
    ("properties", "delivery_mode"),
    ("properties", "priority"),
    ("properties", "correlation_id"),
    ("properties", "reply_to"),
    ("properties", "delivery_info", "exchange"),
    ("properties", "delivery_info", "routing_key"),
    ("properties", "delivery_info", "redelivered"),
    *[("headers", name) for name in HEADER_NAMES],
]

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "base64", "utf-8", "saga.start", "application/json", "binary"])
)
_json = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + "0" + closer * depth


# JSON text, not Python values: the test itself could not json.dumps 990 levels of nesting.
FRAGMENTS: st.SearchStrategy[str] = st.one_of(
    _json.map(json.dumps),
    # kombu's JSON turns these objects into bytes, datetimes, UUIDs... while decoding.
    st.builds(
        lambda kind, value: json.dumps({"__type__": kind, "__value__": value}),
        st.sampled_from(["bytes", "base64", "datetime", "date", "time", "decimal", "uuid", "x"]),
        _json,
    ),
    st.builds(
        lambda char, size: json.dumps(char * size),
        st.sampled_from(["x", "\u00e9", "\ud800", "\x00", "["]),
        st.sampled_from([1_000, 100_000, 1_000_000]),
    ),
    st.builds(_nested, st.sampled_from([50, 500, 900, 960, 990, 1_100, 20_000])),
    st.builds(
        lambda depth: _nested(depth, '{"a":', "}"),
        st.sampled_from([500, 990, 5_000]),
    ),
    st.just("1" * 5_000),  # an integer beyond int_max_str_digits
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BODIES: st.SearchStrategy[str] = st.one_of(
    st.just(json.dumps(GOOD_BODY)),
    _json.map(json.dumps),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.builds(_nested, st.sampled_from([900, 990, 200_000])),
    st.just(pickle.dumps(GOOD_BODY).decode("latin-1")),
    st.just(json.dumps([[], {"saga_type": 5}, {"callbacks": 5}])),
).map(lambda text: _b64(text.encode("utf-8", "surrogatepass")))


@dataclass(frozen=True)
class Envelope:
    """A mutation of a real envelope: keys deleted or set to a JSON fragment."""

    deletions: tuple[tuple[str, ...], ...]
    settings: tuple[tuple[tuple[str, ...], str], ...]
    body: str | None

    def render(self, template: dict[str, Any]) -> bytes:
        envelope = copy.deepcopy(template)
        envelope["headers"]["id"] = uuid.uuid4().hex
        envelope["properties"]["delivery_tag"] = str(uuid.uuid4())
        if self.body is not None:
            envelope["body"] = self.body
        marks: dict[str, str] = {}
        for path in self.deletions:
            _container(envelope, path[:-1], create=False).pop(path[-1], None)
        for path, fragment in self.settings:
            mark = f"@@fragment-{len(marks)}@@"
            marks[json.dumps(mark)] = fragment
            container = _container(envelope, path[:-1], create=True)
            if container is not None:
                container[path[-1]] = mark
        text = json.dumps(envelope)
        for mark, fragment in marks.items():
            text = text.replace(mark, fragment)
        return text.encode("utf-8", "surrogatepass")


def _container(envelope: dict[str, Any], path: tuple[str, ...], create: bool) -> Any:
    node: Any = envelope
    for key in path:
        if not isinstance(node, dict):
            return {}
        if key not in node and create:
            node[key] = {}
        node = node.get(key, {})
    return node if isinstance(node, dict) else {}


ENVELOPES = st.builds(
    Envelope,
    st.lists(st.sampled_from(PATHS), max_size=2).map(tuple),
    st.lists(st.tuples(st.sampled_from(PATHS), FRAGMENTS), max_size=3).map(tuple),
    st.none() | BODIES,
)
RAW: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=100),
    FRAGMENTS.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'{"properties": {}}', b"[" * 200_000]),
)
ITEMS: st.SearchStrategy[Envelope | bytes] = st.one_of(ENVELOPES, ENVELOPES, RAW)


# -- a consumer that handles messages as the worker's does ----------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Rig:
    """One connection, consuming QUEUE through GuardedConsumer's task handler."""

    connection: Any
    client: redis.Redis
    accepted: list[str] = field(default_factory=list)

    def task_handler(self) -> Callable[[Any], Any]:
        """GuardedConsumer's wrapper around Celery's own task handler, on a stub consumer.

        Celery's strategy is replaced by what matters here: the body check of GuardedTask,
        then an ack (Celery hands a good message to the pool, which acks it later)."""

        def strategy(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> None:
            problem = payload_problem(message.payload if body is None else body)
            if problem is not None:
                raise InvalidTaskError(problem)
            self.accepted.append(message.headers["id"])
            ack(logging.getLogger(__name__), self.connection.connection_errors)

        def on_unknown_task(body: Any, message: Any, exc: Exception) -> None:
            # Celery's logs, rejects, then marks the task failed in the result backend.
            logging.getLogger(__name__).error("unknown task %r", message.headers.get("task"))
            message.reject_log_error(logging.getLogger(__name__), ())

        consumer = GuardedConsumer.__new__(GuardedConsumer)
        consumer.__dict__.update(
            strategies={TASK: strategy},
            on_unknown_task=on_unknown_task,
            on_task_message=set(),
            call_soon_ack=lambda callback, *args, **kwargs: callback(*args, **kwargs),
            _maximum_prefetch_restored=True,
            restart_count=0,
            connection_errors=self.connection.connection_errors,
            channel_errors=self.connection.channel_errors,
        )
        handler: Callable[[Any], Any] = consumer.create_task_handler()
        return handler

    def push_and_settle(self, item: bytes) -> None:
        """Push `item`, then a good message behind it; drain until the good one arrived."""
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        self.client.lpush(QUEUE, item)
        self.connection.Producer().publish(
            json.dumps(GOOD_BODY),
            routing_key=QUEUE,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": TASK, "id": sentinel, "lang": "py"},
        )
        for _ in range(40):
            if sentinel in self.accepted:
                return
            # socket.timeout (TimeoutError): nothing arrived in time, the one expected error.
            with suppress(TimeoutError):
                self.connection.drain_events(timeout=0.5)
        raise AssertionError(f"the good message behind the item never arrived: {item[:200]!r}")


@contextmanager
def _rig(redis_url: str) -> Iterator[Rig]:
    """A fresh connection and consumer on an empty queue: each example starts clean."""
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE, "unacked", "unacked_index")
    try:
        with Connection(redis_url, transport=TRANSPORT_PATH) as conn:
            rig = Rig(conn, client)
            # As Celery's task consumer: JSON only (the app's accept_content).
            consumer = conn.Consumer([Queue(QUEUE)], on_message=rig.task_handler(), accept=["json"])
            # Celery's own: log the decoding error and ack the message.
            consumer.on_decode_error = _on_decode_error
            with consumer:
                yield rig
    finally:
        client.close()


def _on_decode_error(message: Any, exc: Exception) -> None:
    logging.getLogger(__name__).critical("cannot decode message body: %r", exc)
    message.ack()


def _settle_one(rig: Rig, template: dict[str, Any], item: Envelope | bytes) -> None:
    raw = item.render(template) if isinstance(item, Envelope) else item
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    accepted_before = len(rig.accepted)
    try:
        rig.push_and_settle(raw)
    finally:
        root.removeHandler(records)
    delivered = len(rig.accepted) - accepted_before - 1  # the sentinel came through too
    assert delivered in (0, 1)
    shown = raw[:300]
    # Exactly one outcome: delivered, or logged once and dropped.
    assert len(records.records) == 1 - delivered, (shown, [r.getMessage() for r in records.records])
    assert rig.client.llen(QUEUE) == 0, shown
    # Settled: nothing left in kombu's unacked bookkeeping to come back after a restart.
    assert rig.client.hlen("unacked") == 0, shown
    assert rig.client.zcard("unacked_index") == 0, shown


@settings(
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(items=st.lists(ITEMS, min_size=1, max_size=3))
def test_every_raw_item_is_delivered_well_formed_or_logged_once_and_dropped(
    redis_url: str, template: dict[str, Any], items: list[Envelope | bytes]
) -> None:
    with _rig(redis_url) as rig:
        for item in items:
            _settle_one(rig, template, item)


@pytest.mark.parametrize(
    "item",
    [
        # kombu's JSON decodes {"__type__": ..., "__value__": ...} objects with a function of
        # the value: a value of the wrong type raised AttributeError or TypeError out of the
        # channel and stopped the worker.
        b'{"__type__": "bytes", "__value__": 5}',
        b'{"__type__": "uuid", "__value__": "x"}',
        b'{"__type__": "datetime", "__value__": []}',
        b'[{"__type__": "decimal", "__value__": {}}]',
    ],
)
def test_kombu_typed_json_objects_of_the_wrong_type_are_dropped(
    redis_url: str, item: bytes
) -> None:
    with _rig(redis_url) as rig:
        _settle_one(rig, {}, item)


def test_a_content_encoding_holding_a_nul_is_dropped(
    redis_url: str, template: dict[str, Any]
) -> None:
    # codecs.lookup raises ValueError (not LookupError) on a NUL, which escaped the consumer's
    # header check and stopped the worker.
    nul = Envelope((), ((("content-encoding",), '"utf-8\\u0000"'),), None)
    with _rig(redis_url) as rig:
        _settle_one(rig, template, nul)
