"""Cancelled time-limit timers dropped from the worker's event loop (main process).

Every step task has a time limit (its timeout, worker/dispatch.py). For each task it runs,
Celery's prefork pool arms a timer in the main process's event loop and, when the task
ends, marks the timer cancelled. kombu's timer keeps cancelled entries in its heap until
their time comes, so the main process holds one per step run of the last `timeout`
seconds: at 500 steps/s and the default 300 s timeout, 150,000 entries and tens of
megabytes that grow like a leak for the first five minutes of every busy period.

`TimerCompaction` rebuilds the heap without them every COMPACT_SECONDS once they are at
least half of it (cancelling stays O(1); the rebuild is amortized, linear in the entries).
It runs as a timer of the same loop, so nothing else touches the heap meanwhile.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

from celery import Celery, bootsteps

log = logging.getLogger(__name__)

#: How often the heap is checked.
COMPACT_SECONDS = 10.0
#: Below this size a heap is left alone whatever it holds.
MIN_ENTRIES = 1024


def compact(timer: Any) -> int:
    """Drop cancelled entries from a kombu `Timer`'s heap when they are at least half of it;
    the number dropped. The list is changed in place: the timer's iterator holds it."""
    queue = timer._queue
    if len(queue) < MIN_ENTRIES:
        return 0
    live = [item for item in queue if not item[2].canceled]
    dropped = len(queue) - len(live)
    if dropped * 2 < len(queue):
        return 0
    heapq.heapify(live)
    queue[:] = live
    return dropped


class TimerCompaction(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: compacts the event loop's timer heap (prefork pool only)."""

    requires = ("celery.worker.components:Hub",)

    def include_if(self, w: Any) -> bool:
        return bool(getattr(w, "use_eventloop", False))

    def start(self, w: Any) -> None:
        hub = getattr(w, "hub", None)
        if hub is not None:
            hub.call_repeatedly(COMPACT_SECONDS, self._compact, hub.timer)

    @staticmethod
    def _compact(timer: Any) -> None:
        try:
            dropped = compact(timer)
        except Exception:  # never stop the event loop over housekeeping
            log.exception("compacting the event loop's timers failed")
            return
        if dropped:
            log.debug("dropped %d cancelled timers from the event loop", dropped)


def install_timer_compaction(app: Celery) -> None:
    app.steps["worker"].add(TimerCompaction)
