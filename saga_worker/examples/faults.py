"""Fault injection of the example sagas, read from the saga's context (docs/contract.md):
``fail_step``, ``flaky_step``, ``slow_step``, ``slow_after_step`` and ``fail_compensation``."""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..core.definition import StepInput


class InjectedFailure(RuntimeError):
    """Raised by the example steps when the context asks for a failure."""


def inject(call: StepInput) -> None:
    """Before a step's effect: sleep, fail, or fail the first attempts, as the context asks."""
    ctx = call.context
    compensating = call.direction.value == "compensate"
    slow = ctx.get("slow_step")
    if isinstance(slow, Mapping) and slow.get("step") == call.step_name and not compensating:
        time.sleep(float(slow.get("seconds", 0)))
    if compensating:
        if ctx.get("fail_compensation") == call.step_name:
            raise InjectedFailure(f"injected failure of {call.step_name}'s compensation")
        return
    if ctx.get("fail_step") == call.step_name:
        raise InjectedFailure(f"injected failure of step {call.step_name}")
    flaky = ctx.get("flaky_step")
    if (
        isinstance(flaky, Mapping)
        and flaky.get("step") == call.step_name
        and call.attempt <= int(flaky.get("failures", 0))
    ):
        raise InjectedFailure(
            f"injected flaky failure {call.attempt} of {flaky.get('failures')} in {call.step_name}"
        )


def after_effect(call: StepInput) -> None:
    """`slow_after_step`: the step's effect is done; sleep, so a timeout leaves it in place."""
    slow = call.context.get("slow_after_step")
    if (
        isinstance(slow, Mapping)
        and slow.get("step") == call.step_name
        and call.direction.value == "forward"
    ):
        time.sleep(float(slow.get("seconds", 0)))
