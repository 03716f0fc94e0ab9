"""One saga's story from its audit rows, for the timeline page: attempts as bars on a time
axis, the context change each step made, the chain's verdict. Pure: rows in, values out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..audit.verify import verify_chain

#: What opens an attempt's bar, and what closes it (with the bar's outcome).
_OPENS = {"step_start": "forward", "compensation_start": "compensate"}
_CLOSES = {
    "step_complete": ("forward", "ok"),
    "step_retry": ("forward", "retried"),
    "step_failed": ("forward", "failed"),
    "compensation_complete": ("compensate", "ok"),
    "compensation_retry": ("compensate", "retried"),
    "compensation_failed": ("compensate", "failed"),
}
#: Rows that may change the context (their snapshot is compared with the one before).
_CHANGES = {"step_complete", "compensation_complete", "signal_received", "saga_migrated"}


@dataclass
class Bar:
    """One attempt of one step or compensation (or one wait), from its start row on."""

    lane: str
    step: str
    direction: str
    attempt: int
    start: datetime
    end: datetime | None = None
    outcome: str = "running"
    duration_ms: float | None = None
    error: str | None = None
    task_id: str | None = None
    wait: str | None = None


@dataclass(frozen=True)
class ContextChange:
    row_id: int
    event_type: str
    step: str | None
    added: dict[str, Any]
    changed: dict[str, tuple[Any, Any]]
    removed: tuple[str, ...]


@dataclass
class Timeline:
    start: datetime
    end: datetime
    bars: list[Bar] = field(default_factory=list)
    lanes: list[str] = field(default_factory=list)
    changes: list[ContextChange] = field(default_factory=list)
    chain_problems: list[str] = field(default_factory=list)

    @property
    def span_seconds(self) -> float:
        return max((self.end - self.start).total_seconds(), 0.001)

    def x(self, moment: datetime) -> float:
        """Where `moment` falls on the axis, from 0 to 1."""
        return min(max((moment - self.start).total_seconds() / self.span_seconds, 0.0), 1.0)


def build(rows: Sequence[Mapping[str, Any]], now: datetime) -> Timeline:
    """The timeline of one saga's audit rows (in id order); `now` ends the bars still open."""
    if not rows:
        return Timeline(now, now)
    timeline = Timeline(rows[0]["timestamp"], rows[-1]["timestamp"])
    open_bars: dict[tuple[str, str, int], Bar] = {}
    previous: Mapping[str, Any] | None = None
    for row in rows:
        kind = row["event_type"]
        data = row.get("event_data") or {}
        step = row.get("step_name") or ""
        number = data.get("attempt")
        attempt = number if isinstance(number, int) else 0
        if kind in _OPENS:
            direction = _OPENS[kind]
            key = (step, direction, attempt)
            if key in open_bars:  # re-sent by recovery: the earlier copy never reported
                _close(open_bars.pop(key), row, "resent")
            lane = step if direction == "forward" else f"{step} (compensation)"
            bar = Bar(
                lane,
                step,
                direction,
                attempt,
                _not_before(data) or row["timestamp"],
                task_id=data.get("task_id") if isinstance(data.get("task_id"), str) else None,
                wait=data.get("wait") if isinstance(data.get("wait"), str) else None,
            )
            if lane not in timeline.lanes:
                timeline.lanes.append(lane)
            open_bars[key] = bar
            timeline.bars.append(bar)
        elif kind in _CLOSES:
            direction, outcome = _CLOSES[kind]
            closed = open_bars.pop((step, direction, attempt), None)
            if closed is not None:
                _close(closed, row, outcome)
        if kind in _CHANGES and previous is not None:
            change = _diff(previous, row)
            if change is not None:
                timeline.changes.append(change)
        if row.get("context_snapshot") is not None:
            # Rows of events that do not change the context carry none (DESIGN section 4).
            previous = row
    for bar in open_bars.values():
        bar.end = None  # still running: drawn up to the end of the axis
    if open_bars:
        timeline.end = max(timeline.end, now)
    timeline.chain_problems = [f"row {p.row_id}: {p.problem}" for p in verify_chain(rows)]
    return timeline


def _not_before(data: Mapping[str, Any]) -> datetime | None:
    """A retry's start row is written when it is scheduled; it may run only from then on."""
    value = data.get("not_before")
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _close(bar: Bar, row: Mapping[str, Any], outcome: str) -> None:
    bar.end = row["timestamp"]
    bar.outcome = outcome
    bar.duration_ms = row.get("duration_ms")
    bar.error = row.get("error_message")


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> ContextChange | None:
    old = before.get("context_snapshot") or {}
    new = after.get("context_snapshot") or {}
    if not isinstance(old, Mapping) or not isinstance(new, Mapping) or old == new:
        return None
    return ContextChange(
        row_id=int(after.get("id") or 0),
        event_type=str(after["event_type"]),
        step=after.get("step_name"),
        added={k: v for k, v in new.items() if k not in old},
        changed={k: (old[k], v) for k, v in new.items() if k in old and old[k] != v},
        removed=tuple(k for k in old if k not in new),
    )
