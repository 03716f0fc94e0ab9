"""Business keys (issue 17): what a definition names, what the core computes once at start,
and what the version fingerprint covers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga_worker.core.business_key import MAX_BUSINESS_KEY, business_key_of, key_text
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested, StepSucceeded
from saga_worker.core.model import Direction
from saga_worker.core.transition import start, transition
from saga_worker.errors import InvalidSagaDefinition
from saga_worker.examples import backtest_workflow, order_workflow
from saga_worker.examples.orders import order_ref
from saga_worker.testing import SagaTestHarness

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def noop(call: StepInput) -> dict[str, Any]:
    return {}


STEPS = [Step("reserve", noop, compensate=noop), Step("ship", noop)]


def keyed(option: Any) -> SagaDefinition:
    return SagaDefinition("keyed", STEPS, business_key=option)


def key_at_start(option: Any, context: Mapping[str, Any]) -> str | None:
    decision = start(keyed(option), StartRequested("s-1", "keyed", context), NOW)
    return decision.saga.business_key


# -- from a context key -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, key",
    [
        ("A-1", "A-1"),
        (42, "42"),
        (-7, "-7"),
        ("x" * MAX_BUSINESS_KEY, "x" * MAX_BUSINESS_KEY),
        ("naïve ✓", "naïve ✓"),
    ],
)
def test_a_string_or_integer_value_of_the_named_context_key_is_the_key(
    value: object, key: str
) -> None:
    assert key_at_start("order_id", {"order_id": value}) == key


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"order_id": None},
        {"order_id": True},
        {"order_id": 4.2},
        {"order_id": 42.0},
        {"order_id": ""},
        {"order_id": "x" * (MAX_BUSINESS_KEY + 1)},
        {"order_id": 10**MAX_BUSINESS_KEY},  # 256 digits
        {"order_id": 10**5000},  # beyond what str() of an int accepts by default
        {"order_id": "a\tb"},
        {"order_id": "a\nb"},
        {"order_id": "a\x00b"},
        {"order_id": "a\x7fb"},
        {"order_id": "\ud800"},
        {"order_id": ["A-1"]},
        {"order_id": {"id": "A-1"}},
        {"other": "A-1"},
    ],
)
def test_any_other_value_gives_no_key(context: dict[str, Any]) -> None:
    assert key_at_start("order_id", context) is None


# -- from a function ------------------------------------------------------------------------


def test_a_function_of_the_context_gives_the_key() -> None:
    assert key_at_start(lambda ctx: f"{ctx['region']}-{ctx['n']}", {"region": "eu", "n": 7}) == (
        "eu-7"
    )


def raises(ctx: Mapping[str, Any]) -> str | None:
    raise KeyError("order_id")


def recurses(ctx: Mapping[str, Any]) -> str | None:
    return recurses(ctx)


@pytest.mark.parametrize(
    "function",
    [
        lambda ctx: None,
        lambda ctx: 42,  # not a str: the function's contract is str | None
        lambda ctx: b"A-1",
        lambda ctx: "",
        lambda ctx: "x" * (MAX_BUSINESS_KEY + 1),
        lambda ctx: "a\x00b",
        lambda ctx: "\udc80",
        raises,
        recurses,
        lambda ctx: 1 / 0,
    ],
)
def test_a_function_that_raises_or_returns_wrongly_gives_no_key(function: Any) -> None:
    decision = start(keyed(function), StartRequested("s-1", "keyed", {"a": 1}), NOW)
    assert decision.ignored is None and decision.commands  # the saga started all the same
    assert decision.saga.business_key is None


def test_the_function_cannot_change_the_context_the_saga_starts_with() -> None:
    def meddles(ctx: Mapping[str, Any]) -> str | None:
        ctx["items"].append("extra")
        ctx.pop("amount")  # type: ignore[attr-defined]
        return "A-1"

    context = {"amount": 3, "items": ["a"]}
    decision = start(keyed(meddles), StartRequested("s-1", "keyed", context), NOW)
    assert decision.saga.business_key == "A-1"
    assert decision.saga.context == {"amount": 3, "items": ["a"]}
    assert context == {"amount": 3, "items": ["a"]}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


# No deadline: under a busy CPU (the integration suite beside it) one example can take
# longer than hypothesis' default 200 ms, which is no failure of the code under test.
@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["k", "order_id", "x"]), JSON, max_size=3))
def test_never_raises_and_any_key_fits_the_column(context: dict[str, Any]) -> None:
    for option in ("k", lambda ctx: ctx.get("k"), lambda ctx: ctx["missing"]):
        key = business_key_of(option, context)
        assert key is None or key_text(key) == key
        if key is not None:
            assert 0 < len(key) <= MAX_BUSINESS_KEY


# -- computed once --------------------------------------------------------------------------


def test_the_key_is_computed_at_start_and_audited_in_saga_start() -> None:
    decision = start(keyed("order_id"), StartRequested("s-1", "keyed", {"order_id": 9}), NOW)
    started = decision.audit[0]
    assert started.event_type == "saga_start"
    assert started.event_data["business_key"] == "9"


def test_without_a_key_saga_start_is_as_before() -> None:
    decision = start(SagaDefinition("plain", STEPS), StartRequested("s-1", "plain", {}), NOW)
    assert decision.saga.business_key is None
    assert "business_key" not in decision.audit[0].event_data


def test_no_later_transition_changes_it_even_when_the_context_does() -> None:
    definition = keyed("order_id")
    saga = start(definition, StartRequested("s-1", "keyed", {"order_id": "A-1"}), NOW).saga
    output = {"order_id": "B-2"}  # a step's output replaces the context key
    after = transition(definition, saga, StepSucceeded(0, Direction.FORWARD, 1, output), NOW)
    assert after.saga.context["order_id"] == "B-2"
    assert after.saga.business_key == "A-1"


def test_a_saga_keeps_its_key_through_the_harness_to_the_end() -> None:
    harness = SagaTestHarness(keyed("order_id"))
    harness.start({"order_id": "A-1"})
    harness.run_until_settled()
    assert harness.saga.state.value == "COMPLETED"
    assert harness.saga.business_key == "A-1"


def test_the_in_memory_store_like_the_sql_one_never_updates_the_key() -> None:
    """A transition decided on a copy without the key (a step message's checkpoint signed by
    an older build) must not erase it: the store writes it at creation only."""
    harness = SagaTestHarness(keyed("order_id"))
    harness.start({"order_id": "A-1"})
    saga_id = harness.saga.saga_id
    definition = harness.definition
    harness.store.apply(
        saga_id,
        lambda saga: transition(
            definition,
            replace(saga, business_key=None),
            StepSucceeded(0, Direction.FORWARD, 1, {}),
            NOW,
        ),
        NOW,
    )
    assert harness.saga.completed_steps == ("reserve",)
    assert harness.saga.business_key == "A-1"


# -- definition time ------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["order_id", "Order Ref", "ключ", noop, lambda ctx: None])
def test_a_context_key_name_or_a_function_is_accepted(option: Any) -> None:
    assert keyed(option).business_key is option


@pytest.mark.parametrize(
    "option", ["", "a\x00b", "line\nbreak", "x" * (MAX_BUSINESS_KEY + 1), 42, b"id", ["id"]]
)
def test_anything_else_is_refused_when_the_definition_is_built(option: Any) -> None:
    with pytest.raises(InvalidSagaDefinition, match="business_key"):
        keyed(option)


def test_a_bad_key_is_listed_with_the_definitions_other_problems() -> None:
    with pytest.raises(InvalidSagaDefinition) as caught:
        SagaDefinition("bad type", [], business_key="")
    text = str(caught.value)
    assert "saga_type" in text and "at least one step" in text and "business_key" in text


# -- versions -------------------------------------------------------------------------------


def test_without_the_option_the_version_is_unchanged() -> None:
    plain = SagaDefinition("keyed", STEPS)
    assert "business_key" not in plain.shape()
    assert plain.version == SagaDefinition("keyed", STEPS, business_key=None).version
    # Pinned: backtest_workflow's version on 0.2.0 before business keys (sagas in flight
    # would park if a deploy changed it).
    assert backtest_workflow.business_key is None
    assert backtest_workflow.version == "440e0cb0ed36"


def test_with_it_the_version_covers_the_key_name_not_the_functions_code() -> None:
    plain = SagaDefinition("keyed", STEPS).version
    by_name = keyed("order_id").version
    assert len({plain, by_name, keyed("ref").version, keyed(noop).version}) == 4
    assert keyed(noop).version == keyed(lambda ctx: "other code").version
    # Not part of the structure: a labelled version may add or change its key.
    assert keyed("order_id").structure == SagaDefinition("keyed", STEPS).structure


def test_order_workflow_keys_orders_by_their_string_order_ref() -> None:
    assert order_workflow.business_key is order_ref
    assert order_ref({"amount": 1, "order_ref": "ORD-1"}) == "ORD-1"
    assert order_ref({"amount": 1, "order_ref": 1}) is None
    assert order_ref({"amount": 1}) is None
