"""The harness's recovery sweep takes an attempt just past its deadline (docs/testing.md:
"advance the clock past them, not onto them"), whatever the SQL column's rounding.

The SQL store indexes a deadline rounded up to a tenth of the attempt's time (so that
checkpoint updates can be HOT, store/codec.py `scan_deadline`). Copied into the in-memory
store, a test that advanced the clock past an attempt's exact deadline found nothing to
recover until the next grain boundary: here 4.5 s later, for a step sent at a fractional
time (after a retry's backoff, or a clock started off the whole second).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.testing import SagaTestHarness
from saga_worker.testing.memory import DEFAULT_START, FakeClock


def noop(call: StepInput) -> dict[str, Any]:
    return {}


LOST = SagaDefinition("review18_lost", [Step("only", noop, timeout_seconds=30)])


def test_recover_just_past_the_exact_deadline_resends_the_lost_attempt() -> None:
    h = SagaTestHarness(LOST, clock=FakeClock(DEFAULT_START + timedelta(seconds=0.5)))
    h.dispatcher.fail_next()  # the broker loses the first message
    h.start({})
    deadline = h.saga.attempts[0].deadline  # 0.5 s + grace 30 s + timeout 30 s
    assert deadline == DEFAULT_START + timedelta(seconds=60.5)
    h.advance_clock(60.1)  # now 60.6 s: past the deadline (the SQL key is 65 s)
    assert h.recover().recovered == 1
    h.run_until_settled()
    assert h.audit_events()[-2:] == ["step_complete", "saga_complete"]
