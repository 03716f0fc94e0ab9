"""Issue 14, item 7: the rows the recovery sweep writes name it (`system:recovery`), not the
user who started the saga; an operator's retry names the operator."""

from __future__ import annotations

from saga_worker.core.recovery import RECOVERY_USER, recovery_event

from .test_transition import HELD_LIMITS, Run


def test_a_stalled_attempt_recovered_by_the_sweep_is_audited_as_system_recovery() -> None:
    run = Run()
    pending = run.saga.pending
    assert pending is not None and run.saga.user_id != RECOVERY_USER
    decision = run.apply(recovery_event(pending), advance=1000)
    recovered = [e for e in decision.audit if e.event_type == "saga_recovered"]
    assert len(recovered) == 1 and recovered[0].user_id == RECOVERY_USER == "system:recovery"
    # The re-sent step_start is the sweep's doing too.
    assert {e.user_id for e in decision.audit} == {RECOVERY_USER}


def test_a_held_attempt_sent_by_the_sweep_is_audited_as_system_recovery() -> None:
    run = Run(limits=HELD_LIMITS)
    run.fail()
    run.fail()
    held = run.saga.pending
    assert held is not None and held.held
    decision = run.apply(recovery_event(held), advance=11)
    assert [(e.event_type, e.user_id) for e in decision.audit] == [("step_start", RECOVERY_USER)]
