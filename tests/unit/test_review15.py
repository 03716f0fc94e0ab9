"""Adversarial review of issue 15 (definition versions): failing tests for what it found.

Each test states what should hold; the docstring says what goes wrong today.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from saga_worker.core.decision import Limits
from saga_worker.core.definition import SagaDefinition, Step, StepInput
from saga_worker.engine import SagaEngine
from saga_worker.errors import UnknownDefinitionVersion
from saga_worker.testing import FakeClock, InMemoryStore, RecordingDispatcher

ROOT = Path(__file__).resolve().parents[2]


def noop(call: StepInput) -> dict[str, Any]:
    return {}


def shaped(saga_type: str, names: list[str], **kwargs: Any) -> SagaDefinition:
    return SagaDefinition(saga_type, [Step(n, noop, compensate=noop) for n in names], **kwargs)


def engine_with(
    store: InMemoryStore,
    dispatcher: RecordingDispatcher,
    clock: FakeClock,
    versions: list[SagaDefinition],
) -> SagaEngine:
    """An engine whose registry has `versions` (the last is the default), as a worker's."""
    by_version = {d.version: d for d in versions}

    def lookup(saga_type: str, version: str | None) -> SagaDefinition:
        if version is None:
            return versions[-1]
        if version not in by_version:
            raise UnknownDefinitionVersion(saga_type, version, list(by_version))
        return by_version[version]

    return SagaEngine(
        store, dispatcher, Limits(stall_grace_seconds=1), clock=clock, definitions=lookup
    )


# -- 6. the docs still send remote results to SAGA_QUEUE --------------------------------------


def test_the_docs_name_the_queue_remote_results_now_go_to() -> None:
    """worker/dispatch.py attaches link/link_error signatures with queue
    `<SAGA_QUEUE>.<type>.<version>`, but docs/contract.md (Remote steps) still says the
    callbacks hand the result to saga.advance 'on SAGA_QUEUE', and docs/rabbitmq.md that
    they 'send each result to the saga queue'. A remote service's broker permissions set up
    from these docs (a Redis ACL or RabbitMQ configure/write regex for `saga` only, as
    users.acl's saga-producer has) now refuse its replies: every remote step stalls."""
    contract = (ROOT / "docs" / "contract.md").read_text()
    rabbit = (ROOT / "docs" / "rabbitmq.md").read_text()
    stale = [
        m.group(0)
        for text in (contract, rabbit)
        for m in re.finditer(
            r"(saga\.advance` on `SAGA_QUEUE`|send each result to the saga queue)", text
        )
    ]
    assert not stale, f"stale claims: {stale}"
