"""Validation of producer messages: saga.start and saga.abort kwargs (docs/contract.md)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from saga_worker.config import Settings
from saga_worker.core.events import AbortRequested, StartRequested
from saga_worker.errors import InvalidRequest, SagaError
from saga_worker.requests import check_context, parse_abort, parse_start

MESSAGE_ID = "5b8e3f0e-2f0c-4a57-9d1e-0d8f4b0c1a11"
SETTINGS = dataclasses.replace(Settings.from_env({}), max_context_bytes=200, max_context_depth=4)
_DROP = object()  # marks a kwarg to leave out


def start_kwargs(**changes: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "saga_type": "backtest_workflow",
        "context": {"strategy_id": 42},
        "saga_id": "bt-2026-11-27-0001",
        "user_id": "user_123",
        "ip_address": "192.168.1.1",
    }
    kwargs.update(changes)
    return {k: v for k, v in kwargs.items() if v is not _DROP}


def rejected_start(field: str, **changes: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_start((), start_kwargs(**changes), SETTINGS, MESSAGE_ID)
    assert info.value.field == field, info.value
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.code == "invalid_request"
    assert isinstance(info.value, SagaError)
    return info.value


# --------------------------------------------------------------- saga.start ---


def test_parse_start_accepts_the_documented_example() -> None:
    event = parse_start((), start_kwargs(), SETTINGS, MESSAGE_ID)
    assert event == StartRequested(
        saga_id="bt-2026-11-27-0001",
        saga_type="backtest_workflow",
        context={"strategy_id": 42},
        user_id="user_123",
        ip_address="192.168.1.1",
    )


def test_parse_start_without_saga_id_takes_the_message_task_id_every_time() -> None:
    kwargs = {"saga_type": "backtest_workflow", "context": {}}
    first = parse_start((), kwargs, SETTINGS, MESSAGE_ID)
    # A redelivery or retry of the same message carries the same task id: the same saga.
    second = parse_start((), kwargs, SETTINGS, MESSAGE_ID)
    assert first.saga_id == second.saga_id == MESSAGE_ID
    assert (first.user_id, first.ip_address, first.context) == (None, None, {})
    other = str(uuid.uuid4())
    assert parse_start((), kwargs, SETTINGS, other).saga_id == other


def test_parse_start_explicit_none_saga_id_also_takes_the_task_id() -> None:
    event = parse_start((), start_kwargs(saga_id=None), SETTINGS, MESSAGE_ID)
    assert event.saga_id == MESSAGE_ID


def test_parse_start_explicit_saga_id_wins_over_the_task_id() -> None:
    event = parse_start((), start_kwargs(saga_id="order-1"), SETTINGS, MESSAGE_ID)
    assert event.saga_id == "order-1"


@pytest.mark.parametrize("message_id", [None, "", "has space", "x" * 256, 42, "nul\x00"])
def test_parse_start_refuses_an_unusable_task_id_when_no_saga_id_is_given(
    message_id: Any,
) -> None:
    kwargs = {"saga_type": "backtest_workflow", "context": {}}
    with pytest.raises(InvalidRequest) as info:
        parse_start((), kwargs, SETTINGS, message_id)
    assert info.value.field == "saga_id"
    assert "pass saga_id explicitly" in str(info.value)


@pytest.mark.parametrize(
    "saga_id", ["a", "A-z_0.9:x", "x" * 255, "bt-2026-11-27-0001", "urn:saga:1"]
)
def test_parse_start_accepts_valid_saga_ids(saga_id: str) -> None:
    assert parse_start((), start_kwargs(saga_id=saga_id), SETTINGS, MESSAGE_ID).saga_id == saga_id


@pytest.mark.parametrize(
    "saga_id",
    ["", "x" * 256, "has space", "a/b", "café", "日本", "tab\tid", "a\\b", 42, ["a"]],
    ids=["empty", "256", "space", "slash", "accent", "cjk", "tab", "backslash", "int", "list"],
)
def test_parse_start_rejects_bad_saga_ids(saga_id: Any) -> None:
    rejected_start("saga_id", saga_id=saga_id)


@pytest.mark.parametrize("saga_id", ["abc\n", "x" * 255 + "\n"], ids=["short", "256"])
def test_parse_start_rejects_saga_id_with_trailing_newline(saga_id: str) -> None:
    rejected_start("saga_id", saga_id=saga_id)


def test_parse_start_rejects_positional_args() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_start(("backtest_workflow",), start_kwargs(), SETTINGS, MESSAGE_ID)
    assert info.value.field == "args"
    assert "keyword arguments only" in str(info.value)


@pytest.mark.parametrize("extra", ["sagatype", "priority", "ctx"])
def test_parse_start_rejects_unknown_kwargs_naming_them(extra: str) -> None:
    err = rejected_start(extra, **{extra: 1})
    assert "unknown argument for saga.start" in str(err)
    for allowed in ("context", "saga_type", "saga_id", "user_id", "ip_address"):
        assert allowed in str(err)


@pytest.mark.parametrize("saga_type", [_DROP, "", None, 7])
def test_parse_start_requires_a_saga_type(saga_type: Any) -> None:
    rejected_start("saga_type", saga_type=saga_type)


def test_parse_start_requires_context() -> None:
    err = rejected_start("context", context=_DROP)
    assert "required" in str(err)


@pytest.mark.parametrize(
    "context",
    [None, [], ["a"], "text", 42, ({"a": 1},)],
    ids=["none", "empty-list", "list", "string", "int", "tuple"],
)
def test_parse_start_rejects_context_that_is_not_an_object(context: Any) -> None:
    err = rejected_start("context", context=context)
    assert "JSON object" in str(err)


def test_parse_start_rejects_context_over_the_size_limit() -> None:
    ok = {"blob": "x" * 180}  # {"blob": "xxx..."} is 192 bytes
    parse_start((), start_kwargs(context=ok), SETTINGS, MESSAGE_ID)
    err = rejected_start("context", context={"blob": "x" * 200})
    assert "over the limit of 200" in str(err)
    assert "SAGA_MAX_CONTEXT_BYTES" in str(err)


def test_context_size_counts_utf8_bytes_not_characters() -> None:
    # 60 characters but 180 bytes of UTF-8: over the limit once the JSON framing is added.
    with pytest.raises(InvalidRequest, match="bytes"):
        check_context({"s": "東" * 65}, SETTINGS, "context")
    check_context({"s": "x" * 65}, SETTINGS, "context")


def test_parse_start_depth_limit() -> None:
    at_limit: dict[str, Any] = {"a": {"b": {"c": {}}}}  # 4 nested objects
    parse_start((), start_kwargs(context=at_limit), SETTINGS, MESSAGE_ID)
    err = rejected_start("context", context={"a": {"b": {"c": {"d": {}}}}})
    assert "SAGA_MAX_CONTEXT_DEPTH" in str(err)
    rejected_start("context", context={"a": [[[[]]]]})


def test_parse_start_very_deep_context_is_rejected_without_recursion_error() -> None:
    deep: Any = {}
    for _ in range(5000):
        deep = {"d": deep}
    rejected_start("context", context=deep)


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), float("-inf")],
    ids=["nan", "inf", "-inf"],
)
def test_parse_start_rejects_non_finite_numbers(bad: float) -> None:
    err = rejected_start("context", context={"x": [1, {"y": bad}]})
    assert "finite" in str(err)


@pytest.mark.parametrize(
    "context",
    [{1: "int key"}, {"a": {1, 2}}, {"a": b"bytes"}, {"a": object()}],
    ids=["int-key", "set", "bytes", "object"],
)
def test_parse_start_rejects_non_json_values(context: Any) -> None:
    rejected_start("context", context=context)


def test_parse_start_accepts_all_json_types() -> None:
    context = {"s": "é", "i": -1, "f": 1.5, "b": False, "n": None, "l": [1, "x"], "o": {}}
    assert parse_start((), start_kwargs(context=context), SETTINGS, MESSAGE_ID).context == context


@pytest.mark.parametrize("given", ["10.0.0.1", "::1", "2001:DB8::0001", "::ffff:10.0.0.1"])
def test_parse_start_accepts_ip_addresses_and_keeps_them_as_sent(given: str) -> None:
    assert parse_start((), start_kwargs(ip_address=given), SETTINGS, MESSAGE_ID).ip_address == given


@pytest.mark.parametrize(
    "ip",
    ["999.1.1.1", "10.0.0", "localhost", "", "1.2.3.4/24", 3232235777, ["10.0.0.1"]],
)
def test_parse_start_rejects_bad_ip_addresses(ip: Any) -> None:
    rejected_start("ip_address", ip_address=ip)


@pytest.mark.parametrize("user_id", [123, ["u"], {"id": 1}, True, "", "x" * 256, "a\nb"])
def test_parse_start_rejects_bad_user_ids(user_id: Any) -> None:
    rejected_start("user_id", user_id=user_id)


def test_parse_start_checks_positional_args_before_anything_else() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_start((1,), {"bogus": 1}, SETTINGS, MESSAGE_ID)
    assert info.value.field == "args"


# --------------------------------------------------------------- saga.abort ---


def test_parse_abort_accepts_valid_input() -> None:
    saga_id, event = parse_abort(
        (), {"saga_id": "bt-1", "reason": "wrong params", "user_id": "ops", "ip_address": "::1"}
    )
    assert saga_id == "bt-1"
    assert event == AbortRequested(reason="wrong params", user_id="ops", ip_address="::1")


def test_parse_abort_defaults_the_reason() -> None:
    _, event = parse_abort((), {"saga_id": "bt-1"})
    assert event.reason == "abort requested"
    assert (event.user_id, event.ip_address) == (None, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"saga_id": ""},
        {"saga_id": "a b"},
        {"saga_id": "x" * 256},
        {"saga_id": "a/b"},
        {"saga_id": "ü"},
        {"saga_id": None},
    ],
    ids=["missing", "empty", "space", "256", "slash", "unicode", "none"],
)
def test_parse_abort_rejects_bad_saga_id(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_abort((), kwargs)
    assert info.value.field == "saga_id"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"saga_id": "a", "context": {}}, "context"),
        ({"saga_id": "a", "reason": 5}, "reason"),
        ({"saga_id": "a", "reason": "r" * 2001}, "reason"),
        ({"saga_id": "a", "user_id": 5}, "user_id"),
        ({"saga_id": "a", "ip_address": "nope"}, "ip_address"),
    ],
)
def test_parse_abort_rejects_bad_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_abort((), kwargs)
    assert info.value.field == field


def test_parse_abort_rejects_positional_args() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_abort(("bt-1",), {})
    assert info.value.field == "args"
    assert "saga.abort" in str(info.value)


def test_settings_defaults_match_design() -> None:
    defaults = Settings.from_env({})
    assert defaults.max_context_bytes == 262_144
    assert defaults.max_context_depth == 32
    assert defaults.queue == "saga"
    assert defaults.celery_config is None


def test_settings_hand_the_default_step_timeout_to_the_state_machine() -> None:
    limits = Settings.from_env({"SAGA_DEFAULT_STEP_TIMEOUT_SECONDS": "12"}).limits()
    assert limits.default_step_timeout_seconds == 12.0


# A lone surrogate is valid JSON ("\ud800") but not UTF-8: refused, never UnicodeEncodeError.
@pytest.mark.parametrize(
    "context",
    [
        {"a": "\ud800"},
        {"k\udfff": 1},
        {"a": [1, {"b": "\udc80"}]},
        {"n": {"\ud800x": None}},
    ],
    ids=["value", "key", "nested-value", "nested-key"],
)
def test_lone_surrogates_anywhere_in_a_context_are_refused(context: dict[str, Any]) -> None:
    error = rejected_start("context", context=context)
    assert "UTF-8" in str(error)
    str(error).encode("utf-8")  # the reason itself quotes nothing unencodable
    with pytest.raises(InvalidRequest, match="UTF-8") as info:
        check_context(context, SETTINGS, "step output")
    assert info.value.field == "step output"


@pytest.mark.parametrize("field", ["user_id", "saga_type"])
def test_lone_surrogates_in_start_text_fields_are_refused(field: str) -> None:
    assert "UTF-8" in str(rejected_start(field, **{field: "bob\ud800"}))


def test_lone_surrogate_in_an_abort_reason_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="UTF-8") as info:
        parse_abort((), {"saga_id": "s-1", "reason": "stop\ud800"})
    assert info.value.field == "reason"


# ------------------------------------------------ text PostgreSQL cannot store (issue 14) ---


# A scope id makes any text a valid IPv6 address to Python's ipaddress, while the column is
# varchar(45) and PostgreSQL refuses NUL in text: both reached the database as a DataError.
@pytest.mark.parametrize("ip", ["fe80::1%a\x00b", "fe80::1%\x01", "fe80::1%" + "x" * 60])
def test_parse_start_rejects_ip_addresses_the_column_cannot_hold(ip: str) -> None:
    rejected_start("ip_address", ip_address=ip)


@pytest.mark.parametrize("saga_type", ["a\x00b", "x\x1b[31m", "tab\there"])
def test_parse_start_rejects_control_characters_in_saga_type(saga_type: str) -> None:
    assert "control characters" in str(rejected_start("saga_type", saga_type=saga_type))


@pytest.mark.parametrize(
    "context",
    [
        {"k\x00": 1},
        {"k\n": 1},
        {"a": {"\x07bell": 1}},
        {"s": "nul\x00inside"},
        {"l": [1, ["esc\x1b"]]},
        {"del": "\x7f"},
    ],
)
def test_parse_start_rejects_control_characters_in_context_keys_and_strings(
    context: dict[str, Any],
) -> None:
    assert "control characters" in str(rejected_start("context", context=context))


def test_parse_start_keeps_tabs_and_line_breaks_in_context_strings() -> None:
    context = {"note": "line one\nline two\r\n\tindented"}
    assert parse_start((), start_kwargs(context=context), SETTINGS, MESSAGE_ID).context == context
