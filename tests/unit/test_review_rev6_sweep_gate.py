"""Review of issue 14, item 6: SweepGate."""

from __future__ import annotations

from saga_worker.worker.app import SweepGate

# -- 2. SweepGate skips a due sweep after a sweep that took over half an interval -----------


def test_sweep_gate_does_not_skip_the_next_beat_after_a_long_sweep() -> None:
    """SweepGate's docstring: "a sweep that is due is never dropped, only merged with the
    one just run (which saw the same overdue attempts)". The gate measures from the previous
    sweep's *end*: with a 10 s interval, a sweep that scanned at t=0 and took 6 s (a page of
    re-sends under the very backlog this change is about) makes the beat's next sweep at
    t=10 return "coalesced", although the scan it is merged with ran 10 s earlier and did not
    see what became overdue since. Recovery (and held retries, documented as "up to one
    period late") then wait a further interval."""
    interval = 10.0
    now = [0.0]
    gate = SweepGate(interval / 2, clock=lambda: now[0])
    assert gate.open()  # the sweep of t=0 scans...
    now[0] = 6.0
    gate.done()  # ...and ends at t=6
    now[0] = interval  # the beat's next tick, one full interval after the last scan
    assert gate.open(), "a sweep one interval after the previous scan was coalesced away"


def test_a_second_beat_means_more_frequent_sweeps_as_documented() -> None:
    """docs/recovery.md: "Any number of beats may run (one per host is fine) ... more beats
    mean more frequent sweeps, not duplicate re-sends." With SweepGate a worker process skips
    every sweep that starts within half an interval of its previous one: two beats 3 s apart
    (interval 10 s) give exactly the sweeps of one beat; the second beat's are all
    "coalesced"."""
    interval = 10.0
    now = [0.0]
    gate = SweepGate(interval / 2, clock=lambda: now[0])
    ticks = sorted([t * interval for t in range(6)] + [t * interval + 3.0 for t in range(6)])
    ran = 0
    for tick in ticks:
        now[0] = tick
        if gate.open():
            ran += 1
            gate.done()  # an instant sweep
    assert ran > 6, f"two beats, 12 sweeps sent in 60 s: {ran} ran, as with one beat"
