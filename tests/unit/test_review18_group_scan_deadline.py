"""A parallel group's indexed `deadline` lets the scan find each branch within its own grain.

`scan_deadline` rounds an attempt's deadline up to a tenth of the attempt's time. A group's
branches have different timeouts, so the branch with the earliest exact deadline may have a
coarse grain (a long step) while a later one has a fine grain (a short step, or a held
retry: 1 s): rounding only the earliest branch's deadline hides the other branch's for up to
the long step's grain (5 minutes for an hour-long step), not a tenth of its own time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from saga_worker.core.model import Attempt, Direction, Saga, SagaState
from saga_worker.store.codec import saga_to_row, scan_deadline

T0 = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)


def group(*attempts: Attempt) -> Saga:
    return Saga("g1", "grouped", SagaState.RUNNING, {}, 0, 3, T0, T0, tuple(attempts))


def attempt(index: int, deadline: datetime, span: float, *, held: bool = False) -> Attempt:
    return Attempt(
        index, Direction.FORWARD, 1, deadline - timedelta(seconds=span), deadline, held=held
    )


def test_a_short_branch_is_not_hidden_behind_a_long_branchs_grain() -> None:
    long = attempt(0, T0 + timedelta(seconds=1), span=3630)  # an hour-long step: 300 s grain
    held = attempt(1, T0 + timedelta(seconds=2), span=0, held=True)  # a retry due at 10:00:02
    row = saga_to_row(group(long, held))
    assert scan_deadline(long) == T0 + timedelta(minutes=5)
    # The scan finds the saga when the held retry is due (1 s grain), not at 10:05.
    assert row["deadline"] == T0 + timedelta(seconds=2)


times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
branches = st.lists(
    st.builds(
        lambda i, d, span: attempt(i, d, span),
        st.integers(0, 9),
        times,
        st.floats(min_value=0, max_value=7 * 86400, allow_nan=False),
    ),
    min_size=2,
    max_size=5,
)


@given(branches)
def test_every_branch_is_found_never_early_and_within_its_own_grain(
    attempts: list[Attempt],
) -> None:
    column = saga_to_row(group(*attempts))["deadline"]
    assert column >= min(a.deadline for a in attempts)  # never before any branch is overdue
    assert all(column <= scan_deadline(a) for a in attempts)
