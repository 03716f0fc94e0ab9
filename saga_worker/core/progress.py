"""How a saga goes forward: a leaf completes, a group joins, the next stage begins (every
branch of a group at once, a wait held in the database, or a step), or the saga completes."""

from __future__ import annotations

from typing import Any

from .builder import Builder, retry_ordinal
from .decision import Decision
from .events import StepFailed, StepSucceeded
from .failing import failed
from .model import Direction, SagaState, Signal
from .rollback import begin_rollback, finish, is_rerun, rollback_from


def succeeded(b: Builder, event: StepSucceeded) -> Decision:
    saga = b.saga
    index = event.step_index
    name = b.definition.steps[index].name
    pending = saga.attempt_for(index, event.direction, event.attempt)
    assert pending is not None  # transition() matched the event against it
    retries_taken = retry_ordinal(pending) or None
    b.settle(index)
    b.update(context={**saga.context, **event.output})
    if event.direction is Direction.FORWARD:
        b.update(completed_steps=(*saga.completed_steps, name))
        rolling_back = saga.abort_requested or saga.state is SagaState.COMPENSATING
        if rolling_back:
            # The abort (or a failed branch) waited for this step: it is undone too.
            b.update(state=SagaState.COMPENSATING)
        b.audit(
            "step_complete",
            index,
            state_before=saga.state,
            event_data={"attempt": event.attempt, "output_keys": sorted(event.output)},
            duration_ms=event.duration_ms,
            retry_count=retries_taken,
        )
        if rolling_back:
            if not b.forward_in_flight():
                begin_rollback(b, index, completed=True)
        else:
            complete_leaf(b, index)
        return b.decision()
    b.update(compensated_steps=(*saga.compensated_steps, name))
    b.audit(
        "compensation_complete",
        index,
        event_data={"attempt": event.attempt},
        duration_ms=event.duration_ms,
        retry_count=retries_taken,
    )
    rollback_from(b, index - 1, rerun=is_rerun(pending))
    return b.decision()


def complete_leaf(b: Builder, index: int) -> None:
    """After leaf `index` completed (audited by the caller): the join, the next stage, or
    the end. The join is this very transaction, once the group's last branch completed."""
    stage = b.definition.stage_of(index)
    done = set(b.saga.completed_steps)
    if any(b.definition.steps[leaf].name not in done for leaf in stage.leaves):
        return  # other branches are still running
    following = stage.leaves[-1] + 1
    if following < len(b.definition.steps):
        begin_stage(b, following)
    else:
        finish(b, SagaState.COMPLETED, "saga_complete", stage.leaves[-1])


def begin_stage(b: Builder, first: int) -> None:
    """Start the stage whose first leaf is `first`: every branch of a group at once (one
    commit, one command each), a wait (held in the database), or a step."""
    stage = b.definition.stage_of(first)
    if stage.kind == "wait":
        begin_wait(b, first)
        return
    for leaf in stage.leaves:
        b.run(leaf, Direction.FORWARD, 1, b.now)


def begin_wait(b: Builder, leaf: int) -> None:
    """Begin the wait at `leaf`; a signal kept for it (it came early) is delivered now."""
    wait = b.definition.wait_of(leaf)
    assert wait is not None
    b.wait(leaf)
    if wait.kind != "signal":
        return
    kept = next((s for s in b.saga.inbox if s.name == wait.signal), None)
    if kept is not None:
        b.update(inbox=tuple(s for s in b.saga.inbox if s is not kept))
        deliver(b, leaf, kept, early=True)


def deliver(b: Builder, leaf: int, signal: Signal, *, early: bool = False) -> None:
    """The wait at `leaf` takes `signal`: its payload merges into the context (audited as
    `signal_received` with the sender), and the wait completes and the saga goes on, or,
    when the payload lacks the wait's required `true` key, the wait fails.

    A payload adds keys to the context but never replaces one: `saga.signal` is not
    authenticated, and a key the saga's steps already wrote (an amount, an account) must
    not be changed by whoever can publish to the broker. Such keys are dropped and named
    in the audit row."""
    wait = b.definition.wait_of(leaf)
    assert wait is not None
    name = b.definition.steps[leaf].name
    context = b.saga.context
    kept = {k: v for k, v in signal.payload.items() if k not in context}
    b.update(context={**context, **kept})
    data: dict[str, Any] = {"signal": signal.name, "payload_keys": sorted(kept)}
    dropped = sorted(set(signal.payload) - set(kept))
    if dropped:
        data["dropped_keys"] = dropped
    if early:
        data["kept_since"] = signal.at.isoformat()
    b.audit(
        "signal_received",
        leaf,
        event_data=data,
        user_id=signal.user_id,
        ip_address=signal.ip_address,
    )
    # The signal's own answer decides, whether or not its key could be merged (a key the
    # context already holds, e.g. an earlier wait's `approved`, is not replaced).
    if wait.require and signal.payload.get(wait.require) is not True:
        failed(
            b,
            StepFailed(
                leaf,
                Direction.FORWARD,
                1,
                error_type="SignalRefused",
                message=f"{name}: signal {signal.name!r} came without {wait.require}=true",
                retryable=False,
            ),
        )
        return
    b.settle(leaf)
    b.update(completed_steps=(*b.saga.completed_steps, name))
    b.audit("step_complete", leaf, event_data={"attempt": 1, "signal": signal.name})
    complete_leaf(b, leaf)
