"""Stages beyond a single step (issue 16, DESIGN section 10): parallel groups and waits.

A definition lists stages. Every leaf (a step, a branch of a group, a wait) is a `Step` with
a flat index, so tokens, task names, audit rows and `completed_steps` keep their meaning; a
wait is a step whose action is a `Wait` (nothing is ever sent for it). `flatten` turns the
stages into those leaves and records which leaves each stage holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .retry import RetryPolicy

if TYPE_CHECKING:
    from .definition import Step

#: A signal name, as `saga.signal` and the CLI accept it.
SIGNAL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,99}")
WaitKind = Literal["signal", "sleep", "approval"]
StageKind = Literal["step", "parallel", "wait"]
#: A wait is one attempt: its timeout fails it (a sleep's completes it).
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Wait:
    """The action of a wait step: what completes it besides its timeout."""

    kind: WaitKind
    signal: str | None = None
    approvers: int = 0
    exclude_starter: bool = False
    #: A payload key that must be `true`: a signal without it fails the wait (DESIGN
    #: section 8: an approval signal with `{"approved": false}` fails `await_approval`).
    require: str | None = None


@dataclass(frozen=True)
class Parallel:
    """Branches that run at the same time, each its own Celery task; the saga goes on when
    all succeeded (DESIGN section 10)."""

    name: str
    branches: tuple[Step, ...]

    def __init__(self, name: str, branches: Sequence[Step]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "branches", tuple(branches))


@dataclass(frozen=True)
class Stage:
    """One stage of a definition: its kind, its name and the flat indexes of its leaves."""

    kind: StageKind
    name: str
    leaves: tuple[int, ...]


def WaitFor(name: str, *, signal: str, timeout_seconds: float, require: str | None = None) -> Step:
    """Pause until `saga.signal` brings `signal` (its payload merges into the context) or
    `timeout_seconds` pass (a failed attempt: compensation follows). With `require`, the
    signal's payload must hold that key as `true`, or the wait fails."""
    return _wait(name, Wait("signal", signal=signal, require=require), timeout_seconds)


def Sleep(name: str, seconds: float) -> Step:
    """A durable timer: a wait that only times out, and then completes."""
    return _wait(name, Wait("sleep"), seconds)


def Approval(
    name: str, *, approvers: int = 1, exclude_starter: bool = True, timeout_seconds: float
) -> Step:
    """Wait for `approvers` distinct identified operators to approve (one rejection, or the
    timeout, fails it); with `exclude_starter`, never the user who started the saga."""
    return _wait(
        name,
        Wait("approval", approvers=approvers, exclude_starter=exclude_starter),
        timeout_seconds,
    )


def _wait(name: str, wait: Wait, timeout: float) -> Step:
    from .definition import Step

    return Step(name, wait, retry=ONE_ATTEMPT, timeout_seconds=timeout)


def flatten(items: Sequence[object]) -> tuple[tuple[Step, ...], tuple[Stage, ...], list[str]]:
    """The leaves, the stages and the problems of a definition's list of stages."""
    from .definition import Step

    leaves: list[Step] = []
    stages: list[Stage] = []
    problems: list[str] = []
    for position, item in enumerate(items):
        if isinstance(item, Parallel):
            first = len(leaves)
            for branch in item.branches:
                if not isinstance(branch, Step):
                    problems.append(
                        f"group {item.name!r}: a branch is a {type(branch).__name__}, "
                        "expected saga_worker.Step"
                    )
                    continue
                if isinstance(branch.action, Wait):
                    problems.append(
                        f"group {item.name!r}: branch {branch.name!r} is a wait; "
                        "waits run on their own, not inside a group"
                    )
                leaves.append(branch)
            if len(item.branches) < 2:
                problems.append(f"group {item.name!r} needs at least two branches")
            stages.append(Stage("parallel", str(item.name), tuple(range(first, len(leaves)))))
        elif isinstance(item, Step):
            kind: StageKind = "wait" if isinstance(item.action, Wait) else "step"
            stages.append(Stage(kind, str(item.name), (len(leaves),)))
            leaves.append(item)
        else:
            # Kept as a leaf so that the definition's own checks name it.
            problems.append(
                f"stage {position} is a {type(item).__name__}, expected saga_worker.Step "
                "or Parallel"
            )
    return tuple(leaves), tuple(stages), problems


def wait_problems(where: str, wait: Wait, has_compensation: bool) -> list[str]:
    """What is wrong with a wait step."""
    found: list[str] = []
    if has_compensation:
        found.append(f"{where}: a wait takes no effect, so it has no compensation")
    if wait.kind == "signal" and (
        not isinstance(wait.signal, str) or not SIGNAL_RE.fullmatch(wait.signal)
    ):
        found.append(f"{where}: WaitFor signal {wait.signal!r} must match {SIGNAL_RE.pattern}")
    if wait.kind == "approval" and (
        isinstance(wait.approvers, bool)
        or not isinstance(wait.approvers, int)
        or wait.approvers < 1
    ):
        found.append(f"{where}: approvers must be an integer >= 1, got {wait.approvers!r}")
    return found
