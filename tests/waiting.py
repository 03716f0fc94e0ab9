"""Waiting in tests: a bounded poll on the condition itself, never a fixed sleep.

A test that sleeps and then asserts passes by chance when the sleep was long enough and fails
by chance when the machine was slow; a negative check after a sleep ("X did not happen") cannot
tell "X never happens" from "X has not happened yet". Wait instead for the thing itself, or for
a positive sign that X had its chance (the worker logged that it handled the message), and fail
with what was awaited when it does not come.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from saga_worker.audit.redaction import Redactor

T = TypeVar("T")
_CARDS_ONLY = Redactor([])


def as_logged(text: str) -> str:
    """`text` as the workers log it: their logs mask card numbers, which a task id or a
    saga_id made of a Luhn-valid run of 13 to 19 digits (dashes allowed) looks like."""
    return _CARDS_ONLY.text(text) or text


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    details: Callable[[], object] | None = None,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `predicate` until it returns something truthy (not None, False, 0 or empty), and
    return that.

    Fails after `timeout` seconds with "timed out ... waiting for <what>", the last value
    seen and `details()` (a log tail, say). Exceptions of the `ignore` types count as "not
    yet" (a server that is still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last: object = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    extra = f"\n{details()}" if details is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){extra}")


def read_logs(paths: Path | Iterable[Path]) -> str:
    """The text of one log file or several (missing ones are empty)."""
    texts = []
    for path in [paths] if isinstance(paths, Path) else paths:
        with contextlib.suppress(FileNotFoundError):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def log_tails(paths: Path | Iterable[Path], chars: int = 3000) -> str:
    """The end of each log, named: what a failed wait shows."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    return "\n".join(f"--- {path}\n{read_logs(path)[-chars:]}" for path in files)


def wait_for_log(
    paths: Path | Iterable[Path], needle: str, timeout: float = 30, *, count: int = 1
) -> str:
    """Wait until `needle` occurs `count` times in the logs; returns their text."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    logged = as_logged(needle)
    return wait_for(
        lambda: text if (text := read_logs(files)).count(logged) >= count else None,
        timeout,
        f"{needle!r} logged {count} time(s)",
        interval=0.1,
        details=lambda: log_tails(files),
    )


# Celery logs a task's end (INFO, from the trace in the process that ran it) after the task
# function returned: after anything the task wrote. "raised expected" is an exception the task
# declares (a failed step attempt, reported as such); a retry is not an end: it runs again.
_TASK_END = re.compile(
    r"Task [\w.]+\[(?P<id>[\w*-]+)\] "
    r"(?P<end>succeeded in|raised expected|raised unexpected|INTERNAL ERROR|ignored)"
)
_TASK_FAILED = ("raised unexpected", "INTERNAL ERROR")


def finished_tasks(text: str) -> dict[str, str]:
    """How each task whose end Celery logged in `text` ended, by task id as logged
    (`as_logged`): "succeeded in", "raised unexpected", ..."""
    return {m.group("id"): m.group("end") for m in _TASK_END.finditer(text)}


def wait_for_tasks(
    paths: Path | Iterable[Path], task_ids: Iterable[str], timeout: float = 30
) -> None:
    """Wait until Celery logged the end of every task in `task_ids` (run, not merely
    received), then fail if any of them raised an exception it does not declare."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    wanted = {as_logged(task_id) for task_id in task_ids}

    def ended() -> dict[str, str]:
        return {i: e for i, e in finished_tasks(read_logs(files)).items() if i in wanted}

    done = wait_for(
        lambda: found if (found := ended()).keys() >= wanted else None,
        timeout,
        f"{len(wanted)} task(s) to finish",
        interval=0.1,
        details=lambda: f"unfinished: {sorted(wanted - ended().keys())}\n{log_tails(files)}",
    )
    failed = {i: e for i, e in done.items() if e in _TASK_FAILED}
    assert not failed, f"tasks did not succeed: {failed}\n{log_tails(files)}"


_TASK_RECEIVED = re.compile(r"Task [\w.]+\[(?P<id>[\w*-]+)\] received")
# The end of one run of a task: besides the ends above, a retry (the next run, if any, is
# received again) and a message discarded unrun (revoked, or expired as the beat's sweeps do).
_RUN_END = re.compile(
    r"Task [\w.]+\[(?P<id>[\w*-]+)\] "
    r"(?:succeeded in|raised expected|raised unexpected|INTERNAL ERROR|ignored|retry:)"
    r"|Discarding revoked task: [\w.]+\[(?P<discarded>[\w*-]+)\]"
)


def unfinished_tasks(text: str) -> set[str]:
    """Ids of the tasks a worker logged as received more often than it logged a run of them
    ending in `text`: what it is running or holding."""
    received = Counter(m.group("id") for m in _TASK_RECEIVED.finditer(text))
    ended = Counter(m.group("id") or m.group("discarded") for m in _RUN_END.finditer(text))
    return {task_id for task_id, runs in received.items() if runs > ended[task_id]}
