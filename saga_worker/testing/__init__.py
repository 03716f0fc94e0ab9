"""Test helpers for saga authors: unit-test a saga definition without a broker or database.

- `SagaTestHarness`: start a saga, run its local steps in-process, deliver results, move
  the clock, run the recovery sweep, and inspect the saga and its audit trail; everything
  goes through the real `SagaEngine` (docs/testing.md).
- `InMemoryStore`, `RecordingDispatcher`, `FakeClock`: the pieces the harness builds the
  engine from, for tests that build an engine themselves.
- `check_golden` / `replay`: golden audit trails replayed through the pure `transition`.
"""

from .golden import UPDATE_ENV, check_golden, event_from_json, event_to_json, replay
from .harness import HarnessError, SagaTestHarness, StepRun
from .memory import (
    DEFAULT_START,
    FakeClock,
    InMemoryStore,
    RecordingDispatcher,
    SendFailed,
    SentAttempt,
)

__all__ = [
    # the harness
    "HarnessError",
    "SagaTestHarness",
    "StepRun",
    # engine parts
    "DEFAULT_START",
    "FakeClock",
    "InMemoryStore",
    "RecordingDispatcher",
    "SendFailed",
    "SentAttempt",
    # golden trails
    "UPDATE_ENV",
    "check_golden",
    "event_from_json",
    "event_to_json",
    "replay",
]
