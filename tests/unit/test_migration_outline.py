"""The outline of a saga's old version, which a migration checks it against: from the
registered definition, else from the audit trail, whatever SAGA_REDACT_KEYS masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from saga_worker.audit.redaction import REDACTED, Redactor
from saga_worker.client import SagaClient
from saga_worker.config import Settings
from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.core.events import StartRequested
from saga_worker.core.migration import OutlineStep, Shape, outline_event_data
from saga_worker.engine import SagaEngine
from saga_worker.errors import UnknownDefinitionVersion
from saga_worker.migrator import Migrator
from saga_worker.store.migrate import upgrade
from saga_worker.testing import RecordingDispatcher


def noop(call: StepInput) -> dict[str, Any]:
    return {}


V1 = SagaDefinition(
    "outlined", [Step("reserve", noop, compensate=noop), Step("ship", noop)], version="1"
)


def test_the_registered_old_version_is_preferred_to_a_masked_audit_outline(
    tmp_path: Path,
) -> None:
    """Review 15: the saga_start row kept the outline as [{"name": ..., "compensate": ...}], and
    audit event_data is redacted by key (SAGA_REDACT_KEYS). An operator who redacts a PII
    key `name` (customer names) got every step name stored as ***REDACTED***. migrator.py
    preferred that audit outline to the registered definition (docs/deploys.md says the
    opposite order), so `saga-worker migrate` then refused any saga with a completed or
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


def gone(saga_type: str, version: str | None) -> SagaDefinition:
    raise UnknownDefinitionVersion(saga_type, str(version), ["2"])


@pytest.mark.parametrize("keys", ["", "name", "name,compensate"])
def test_the_outline_audit_rows_keep_survives_redaction_keys(keys: str) -> None:
    """The outline is [name, compensate] pairs: no key of it for SAGA_REDACT_KEYS to hit."""
    row = {
        "event_type": "saga_migrated",
        "event_data": Redactor(keys.split(",")).value(
            {"to_version": "1", "steps": outline_event_data(V1)}
        ),
    }
    assert row["event_data"]["steps"] == [["reserve", True], ["ship", False]]
    assert Shape.from_audit([row], "1") == Shape.of(V1, "1")


def test_an_outline_in_the_first_form_is_read_and_a_masked_one_is_unknown() -> None:
    """Rows of the first 0.4 builds keep {"name", "compensate"} objects: still read; masked
    (a redaction key `name`), they are no outline rather than a wrong one."""
    first = [{"name": "reserve", "compensate": True}, {"name": "ship", "compensate": False}]
    rows = [{"event_type": "saga_start", "event_data": {"definition_version": "1", "steps": first}}]
    assert Shape.from_audit(rows, "1") == Shape(
        "1", (OutlineStep("reserve", True), OutlineStep("ship", False))
    )
    for keys in (["name"], ["compensate"], ["steps"]):
        masked = [{**r, "event_data": Redactor(keys).value(r["event_data"])} for r in rows]
        assert Shape.from_audit(masked, "1") is None, keys
    for odd in ([["a"]], [["a", "yes"]], [[1, True]], [["a", True, 3]], ["a"]):
        bad = {"event_type": "saga_start", "event_data": {"definition_version": "1", "steps": odd}}
        assert Shape.from_audit([bad], "1") is None, odd


def test_without_the_old_version_registered_the_audit_outline_is_used(tmp_path: Path) -> None:
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    old = SagaEngine(client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: V1)
    old.start(StartRequested("s", "outlined", {}))
    saga = client.store.load("s")
    assert saga is not None
    new = SagaEngine(client.store, RecordingDispatcher(), Limits(), definitions=gone)
    assert Migrator(client.store, lambda dry_run: new, str).shape_of(saga) == Shape.of(V1, "1")


def test_without_the_old_version_and_with_a_masked_outline_it_is_unknown(tmp_path: Path) -> None:
    """A saga_start row written as the first 0.4 builds did, under SAGA_REDACT_KEYS=name."""
    client = SagaClient(Settings.from_env({"SAGA_HOME": str(tmp_path)}))
    upgrade(client.store.engine)
    old = SagaEngine(client.store, RecordingDispatcher(), Limits(), definitions=lambda t, v: V1)
    old.start(StartRequested("s", "outlined", {}))
    saga = client.store.load("s")
    assert saga is not None
    first = [{"name": REDACTED, "compensate": True}, {"name": REDACTED, "compensate": False}]
    row = {"event_type": "saga_start", "event_data": {"definition_version": "1", "steps": first}}
    new = SagaEngine(client.store, RecordingDispatcher(), Limits(), definitions=gone)
    assert Migrator(_Reads(client, [row]), lambda dry_run: new, str).shape_of(saga) is None


class _Reads:
    """The client's store, with the audit rows a test says."""

    def __init__(self, client: SagaClient, rows: list[dict[str, Any]]) -> None:
        self.client, self.rows = client, rows

    def load(self, saga_id: str) -> Any:
        return self.client.store.load(saga_id)

    def shape_rows(self, saga_id: str) -> list[dict[str, Any]]:
        return self.rows

    def in_flight_ids(
        self, saga_type: str, version: str, *, after: str = "", limit: int = 100
    ) -> list[str]:
        return []
