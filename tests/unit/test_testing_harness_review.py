"""Review of issue 13: SagaTestHarness against the worker and its own documentation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saga_worker.core.definition import Remote, SagaDefinition, Step, StepInput
from saga_worker.core.events import StepFailed
from saga_worker.testing import HarnessError, SagaTestHarness


def _ok(call: StepInput) -> Mapping[str, Any]:
    return {"done": call.step_name}


def test_retry_of_a_live_attempt_is_not_silently_refused() -> None:
    # harness.retry's docstring: "a live one has its pending attempt re-sent now (the CLI
    # asks for --force while that attempt has not stalled; this does not)"; docs/testing.md:
    # "A call the saga cannot take now raises HarnessError". Since the refusal moved into
    # the core (RetryRequested.force), the harness sends force=False and has no way to say
    # otherwise: the retry is refused and handed back as an ignored Decision, silently.
    definition = SagaDefinition("live", [Step("one", _ok), Step("two", Remote("svc.two", "q"))])
    h = SagaTestHarness(definition)
    h.start({})
    h.run_until_settled()  # "one" ran; "two" is in flight at a remote service
    sent_before = len(h.sent)
    try:
        decision = h.retry()
    except HarnessError:
        return  # refused loudly: what the docs promise for a call the saga cannot take
    assert decision.ignored is None, decision.ignored
    assert len(h.sent) == sent_before + 1  # re-sent now, as the docstring says


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ failed")


def _raises_unprintable(call: StepInput) -> Mapping[str, Any]:
    raise _Unprintable()


def test_a_step_whose_exception_cannot_be_rendered_fails_as_on_a_worker() -> None:
    # The worker's step task describes the exception with worker/messages.describe, which
    # records "<_Unprintable whose message cannot be rendered>" and goes on. The harness
    # calls str(exc) itself, inside its except block: the test run dies with RuntimeError.
    h = SagaTestHarness(SagaDefinition("unprintable", [Step("one", _raises_unprintable)]))
    h.start({})
    run = h.run_next()
    assert isinstance(run.event, StepFailed) and "cannot be rendered" in run.event.message
