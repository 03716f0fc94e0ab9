"""Review of issue 15: the step outline kept for migrations goes through audit redaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested
from saga_worker.core.migration import Shape
from saga_worker.engine import SagaEngine
from saga_worker.migrator import Migrator
from saga_worker.store.migrate import upgrade
from saga_worker.testing import RecordingDispatcher


def noop(call: StepInput) -> dict[str, Any]:
    return {}


V1 = SagaDefinition(
    "outlined", [Step("reserve", noop, compensate=noop), Step("ship", noop)], version="1"
)


def test_the_recorded_outline_survives_a_redact_key_called_name(tmp_path: Path) -> None:
    """The saga_start row keeps the outline as [{"name": ..., "compensate": ...}], and
    audit event_data is redacted by key (SAGA_REDACT_KEYS). An operator who redacts a PII
    key `name` (customer names) gets every step name stored as ***REDACTED***. migrator.py
    prefers that audit outline to the registered definition (docs/deploys.md says the
    opposite order), so `saga-worker migrate` then refuses any saga with a completed or
    sent step ('it recorded step reserve, which the outline of version 1 does not have'),
    even with the old version registered; one whose old code is gone cannot be migrated."""
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path), "SAGA_REDACT_KEYS": "name"}))
    upgrade(client.store.engine)
    engine = SagaEngine(client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: V1)
    engine.start(StartRequested("s", "outlined", {}))
    saga = client.store.load("s")
    assert saga is not None
    shape = Migrator(client.store, lambda dry_run: engine, str).shape_of(saga)
    assert shape == Shape.of(V1, "1"), f"the outline a migration would use: {shape}"
