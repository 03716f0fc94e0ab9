"""The checkpoint columns a transition rewrites, kept small and HOT-friendly (issue 18).

`pending` leaves attempt fields at their defaults out and reads them back; the indexed
`deadline` is the attempt's rounded up to a grain of at most a tenth of its time, so the
recovery scan never finds a saga early and finds it at most one grain late, and the next
step's deadline is mostly the same value (an update that changes no indexed column can be
HOT).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from saga_worker.core.model import Attempt, Direction
from saga_worker.store.codec import (
    DEADLINE_GRAINS,
    pending_from_json,
    pending_to_json,
    scan_deadline,
)
from saga_worker.store.connect import compact_json

times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
spans = st.floats(min_value=0, max_value=7 * 86400, allow_nan=False)
attempts = st.builds(
    lambda start, span, **kw: Attempt(
        not_before=start, deadline=start + timedelta(seconds=span), **kw
    ),
    times,
    spans,
    step_index=st.integers(0, 50),
    direction=st.sampled_from(Direction),
    number=st.integers(1, 10**6),
    recoveries=st.integers(0, 5),
    held=st.booleans(),
    first=st.integers(1, 10**6),
    uncertain=st.booleans(),
    allowance=st.sampled_from([0.0, 5.0, 30.0, 61.5]),
)


@given(attempts)
def test_pending_round_trips_through_compact_json(attempt: Attempt) -> None:
    import json

    stored = json.loads(compact_json(pending_to_json(attempt)))
    assert pending_from_json(stored) == attempt


def test_pending_leaves_defaults_out() -> None:
    at = datetime(2026, 12, 2, tzinfo=UTC)
    attempt = Attempt(0, Direction.FORWARD, 1, at, at + timedelta(seconds=60))
    assert pending_to_json(attempt) == {
        "step_index": 0,
        "direction": "forward",
        "number": 1,
        "not_before": at.isoformat(),
        "deadline": (at + timedelta(seconds=60)).isoformat(),
    }
    assert compact_json({"a": [1, 2]}) == '{"a":[1,2]}'


@given(attempts)
def test_the_scan_deadline_is_never_early_and_at_most_a_grain_late(attempt: Attempt) -> None:
    span = (attempt.deadline - attempt.not_before).total_seconds()
    scanned = scan_deadline(attempt)
    assert scanned >= attempt.deadline
    assert scanned - attempt.deadline < timedelta(seconds=max(1, span / 10))
    assert scanned.microsecond == 0 and scanned.tzinfo is not None
    # A whole number of grains since the epoch: the same for every deadline in that grain.
    assert any(int(scanned.timestamp()) % g == 0 for g in DEADLINE_GRAINS)


@given(times, st.floats(min_value=0.001, max_value=0.5))
def test_the_next_step_mostly_keeps_the_scan_deadline(start: datetime, gap: float) -> None:
    """Steps with a 300 s timeout sent `gap` seconds apart: the indexed value changes only
    when a 30 s grain boundary falls between their deadlines."""
    timeout = timedelta(seconds=330)
    first = Attempt(0, Direction.FORWARD, 1, start, start + timeout)
    later = start + timedelta(seconds=gap)
    second = Attempt(1, Direction.FORWARD, 1, later, later + timeout)
    boundary = scan_deadline(first)
    if second.deadline <= boundary:
        assert scan_deadline(second) == boundary
    else:
        assert scan_deadline(second) == boundary + timedelta(seconds=30)


def test_examples() -> None:
    at = datetime(2026, 12, 2, 10, 0, 0, 1234, tzinfo=UTC)
    wait = Attempt(2, Direction.FORWARD, 1, at, at, held=True)  # a wait's due time
    assert scan_deadline(wait) == datetime(2026, 12, 2, 10, 0, 1, tzinfo=UTC)
    step = Attempt(0, Direction.FORWARD, 1, at, at + timedelta(seconds=330))
    assert scan_deadline(step) == datetime(2026, 12, 2, 10, 6, 0, tzinfo=UTC)
    exact = datetime(2026, 12, 2, 10, 6, 0, tzinfo=UTC)
    on_grain = Attempt(0, Direction.FORWARD, 1, exact - timedelta(seconds=330), exact)
    assert scan_deadline(on_grain) == exact
