"""The worker's event-loop timers: cancelled time limits do not pile up (worker/timers.py).

A real kombu Timer, as the prefork pool's hub uses it: one entry per task's time limit,
cancelled when the task ends. Compaction drops the cancelled ones (only once they are at
least half of a heap of MIN_ENTRIES or more) and the live ones still fire, in order.
"""

from __future__ import annotations

from typing import Any

from kombu.asynchronous.timer import Timer

from saga_worker.worker.app import create_app
from saga_worker.worker.timers import MIN_ENTRIES, TimerCompaction, compact


def new_timer() -> Any:
    return Timer()  # type: ignore[no-untyped-call]


def fired(timer: Any, until: int) -> list[int]:
    out: list[int] = []
    for _, entry in timer:
        if entry is None:
            break
        out.append(entry())
        if len(out) == until:
            break
    return out


def test_cancelled_time_limits_are_dropped_and_live_ones_still_fire() -> None:
    timer = new_timer()
    entries = [timer.call_at(float(i), lambda i=i: i) for i in range(4 * MIN_ENTRIES)]
    for i, entry in enumerate(entries):
        if i % 4:
            timer.cancel(entry)  # three of four tasks ended before their limit
    queue = timer._queue
    assert compact(timer) == 3 * MIN_ENTRIES
    assert timer._queue is queue and len(queue) == MIN_ENTRIES  # in place
    assert fired(timer, MIN_ENTRIES) == list(range(0, 4 * MIN_ENTRIES, 4))


def test_a_heap_mostly_live_or_small_is_left_alone() -> None:
    timer = new_timer()
    entries = [timer.call_at(float(i), lambda i=i: i) for i in range(2 * MIN_ENTRIES)]
    for entry in entries[: MIN_ENTRIES - 1]:
        timer.cancel(entry)
    assert compact(timer) == 0 and len(timer._queue) == 2 * MIN_ENTRIES
    small = new_timer()
    for entry in [small.call_at(float(i), lambda: None) for i in range(MIN_ENTRIES - 1)]:
        small.cancel(entry)
    assert compact(small) == 0


def test_compacting_while_the_loop_iterates_keeps_its_view() -> None:
    """The hub's iterator holds the heap list: compaction between two of its steps."""
    timer = new_timer()
    entries = [timer.call_at(float(i), lambda i=i: i) for i in range(4 * MIN_ENTRIES)]
    iterator = iter(timer)
    _, first = next(iterator)
    assert first is not None and first() == 0
    for entry in entries[1:]:
        if entry() % 2:
            timer.cancel(entry)
    assert compact(timer) == 2 * MIN_ENTRIES
    rest = [entry() for _, entry in (next(iterator) for _ in range(2 * MIN_ENTRIES - 1))]
    assert rest == list(range(2, 4 * MIN_ENTRIES, 2))


def test_the_worker_app_has_the_bootstep() -> None:
    app = create_app()
    assert TimerCompaction in app.steps["worker"]
