"""Golden audit trails (tests/golden/*.json) replayed through the pure `transition`.

Each file records a start and the events fed after it, with a fixed `now` each, and what
every transition produced. Any change of behaviour fails here with a diff; when the change
is intended, regenerate the expectations and review the files' diff:

    SAGA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_testing_golden.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from saga_worker.core.definition import SagaDefinition, Step
from saga_worker.core.retry import RetryPolicy
from saga_worker.testing import UPDATE_ENV, check_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NOOP: Any = lambda call: {}  # noqa: E731  (transition never runs steps)


def order(retry: RetryPolicy) -> SagaDefinition:
    """reserve, notify (nothing to undo), charge, ship: the definition the files name."""
    undo_policy = RetryPolicy(max_attempts=2, initial_delay_seconds=1, jitter=0)
    return SagaDefinition(
        "order",
        [
            Step(
                name,
                NOOP,
                compensate=None if name == "notify" else NOOP,
                retry=retry,
                compensation_retry=undo_policy,
                timeout_seconds=60,
            )
            for name in ("reserve", "notify", "charge", "ship")
        ],
    )


DEFINITIONS = {
    "order": order(
        RetryPolicy(max_attempts=3, initial_delay_seconds=5, backoff_factor=4, jitter=0)
    ),
    # Seeded jitter is part of the behaviour: the retry scenario pins the delays it gives.
    "order_jitter": order(
        RetryPolicy(max_attempts=3, initial_delay_seconds=5, backoff_factor=4, jitter=0.2)
    ),
}
FILES = sorted(GOLDEN.glob("*.json"))


def test_the_golden_scenarios_are_there() -> None:
    names = {path.stem for path in FILES}
    assert {
        "success",
        "retry",
        "compensation",
        "compensation_failure",
        "operator_retry",
        "abort",
        "abort_held",
        "stalled_recovery",
        "give_up",
        "unknown_outcome",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=[path.stem for path in FILES])
def test_golden_trail_replays_unchanged(path: Path) -> None:
    check_golden(path, DEFINITIONS)


# Under SAGA_UPDATE_GOLDEN=1 check_golden rewrites instead of comparing.
comparing = pytest.mark.skipif(
    os.environ.get(UPDATE_ENV) == "1", reason="the golden files are being rewritten"
)


@comparing
def test_a_behaviour_change_fails_the_replay() -> None:
    """The replay bites: one retry fewer changes the retry scenario's expected transitions."""
    fewer = order(
        RetryPolicy(max_attempts=2, initial_delay_seconds=5, backoff_factor=4, jitter=0.2)
    )
    # Under the version label of the original (as an explicit version= kept across a change
    # would be): the fingerprint alone would already differ at the start.
    object.__setattr__(fewer, "version", DEFINITIONS["order_jitter"].version)
    changed = {**DEFINITIONS, "order_jitter": fewer}
    with pytest.raises(AssertionError, match=r"retry\.json: transition 5 \(StepFailed") as info:
        check_golden(GOLDEN / "retry.json", changed)
    assert '-      "event_type": "step_retry"' in str(info.value)
    assert UPDATE_ENV in str(info.value)


@comparing
def test_update_mode_rewrites_only_the_expectations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "abort.json"
    shutil.copy(GOLDEN / "abort.json", copy)
    data = json.loads(copy.read_text())
    data["transitions"][-1]["expect"]["saga_changes"]["state"] = "COMPLETED"
    data["audit_head"] = "0" * 64
    copy.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="transition 5"):
        check_golden(copy, DEFINITIONS)
    monkeypatch.setenv(UPDATE_ENV, "1")
    check_golden(copy, DEFINITIONS)
    assert copy.read_text() == (GOLDEN / "abort.json").read_text()
