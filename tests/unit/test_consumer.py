"""The worker consumer's checks on task message headers (saga_worker/worker/consumer.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from saga_worker.worker.consumer import header_problem

GOOD = {"task": "saga.start", "id": "6f1c", "lang": "py"}


@pytest.mark.parametrize(
    ("headers", "encoding", "problem"),
    [
        (GOOD, "utf-8", None),
        (GOOD, "binary", None),
        (GOOD, None, None),
        ({"lang": "py"}, "utf-8", None),  # no task header: Celery's protocol 1 path decides
        (None, "utf-8", "headers are a NoneType"),
        (["task"], "utf-8", "headers are a list"),
        ({**GOOD, "task": ["saga.start"]}, "utf-8", "the task header is a list"),
        ({**GOOD, "task": None}, "utf-8", "the task header is a NoneType"),
        ({"task": "saga.start"}, "utf-8", "no id header"),
        ({**GOOD, "id": ""}, "utf-8", "no id header"),
        ({**GOOD, "id": 7}, "utf-8", "no id header"),
        (GOOD, "x-no-such-codec", "unknown content encoding"),
    ],
)
def test_header_problem(headers: Any, encoding: str | None, problem: str | None) -> None:
    found = header_problem(headers, encoding)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({"timelimit": [None, None]}, True),
        ({"timelimit": [30, 40.5]}, True),
        ({"timelimit": ["x", "y"]}, False),
        ({"timelimit": 5}, False),
        ({"timelimit": [1, 2, 3]}, False),
        ({"timelimit": [float("inf"), None]}, False),
        ({"timelimit": [True, None]}, False),
        ({"stamped_headers": ["a"], "stamps": {"a": "b"}}, True),
        ({"stamped_headers": 5}, False),
        ({"stamps": "x"}, False),
        ({"retries": 0}, True),
        ({"retries": "many"}, False),
        ({"retries": -1}, False),
        ({"kwargsrepr": "x" * 20_000}, False),
        ({"ignore_result": "yes"}, False),
        ({"expires": 10.5}, True),
        ({"expires": ["x"]}, False),
    ],
)
def test_headers_read_after_the_handler_must_have_their_type(
    extra: dict[str, Any], ok: bool
) -> None:
    found = header_problem({**GOOD, **extra}, "utf-8")
    assert (found is None) is ok, found


def test_redis_envelopes_with_a_compression_header_are_refused_before_decoding() -> None:
    from saga_worker.worker.broker import envelope_problem

    headers = {**GOOD, "compression": "application/x-gzip"}
    envelope = {
        "body": "eJw=",
        "headers": headers,
        "properties": {
            "delivery_tag": "t",
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "saga"},
        },
    }
    assert envelope_problem(envelope) == "compressed message refused: saga_worker sends none"
    del headers["compression"]
    assert envelope_problem(envelope) is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda p: p.pop("delivery_info"), "delivery_info has no exchange and routing_key"),
        (lambda p: p.update(delivery_info={"exchange": ""}), "delivery_info has no exchange"),
        (lambda p: p.update(delivery_info=[]), "delivery_info has no exchange"),
        (lambda p: p.update(delivery_tag=[]), "delivery_tag is not a string"),
        (lambda p: p.update(delivery_tag=""), "delivery_tag is not a string"),
        (lambda p: p.update(body_encoding="rot13"), "body_encoding 'rot13' is not one kombu"),
        (lambda p: p.update(body_encoding=5), "body_encoding '5' is not one kombu"),
    ],
)
def test_redis_envelopes_kombu_would_crash_on_are_refused(
    change: Callable[[dict[str, Any]], object], problem: str
) -> None:
    """Each of these raised inside kombu's Redis channel (KeyError in QoS.append, an
    unhashable tag, no codec for the encoding) and stopped the worker."""
    from saga_worker.worker.broker import envelope_problem

    properties: dict[str, Any] = {
        "delivery_tag": "t",
        "body_encoding": "base64",
        "delivery_info": {"exchange": "", "routing_key": "saga"},
    }
    envelope = {"body": "W10=", "headers": dict(GOOD), "properties": properties}
    assert envelope_problem(envelope) is None
    change(properties)
    found = envelope_problem(envelope)
    assert found is not None and problem in found, found
