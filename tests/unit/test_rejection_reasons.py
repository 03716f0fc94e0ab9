"""Every reason a task refuses a message with is one saga_rejected_total knows (review 15)."""

from __future__ import annotations

import re
from pathlib import Path

from saga_worker.metrics.hooks import REJECTION_REASONS

PACKAGE = Path(__file__).resolve().parents[2] / "saga_worker"
REASON = re.compile(r"(?:refused\(\s*runtimes,|\.rejected\()\s*\"([a-z_]+)\"", re.S)


def test_every_refusal_reason_a_task_uses_is_a_known_rejection_reason() -> None:
    """worker/steps.py refuses a step of a version this worker lacks with
    `refused(runtimes, "wrong_version", ...)`, but the metrics hook every worker installs
    (worker/app.py: `runtimes.rejection_hooks.append(metrics_hook.on_rejected)`) raises
    ValueError('unknown rejection reason') for anything outside REJECTION_REASONS. So that
    path never returns its {"ran": False} refusal: the step task fails with a ValueError
    traceback (FAILURE in Flower, an ERROR log per delivery) and saga_rejected_total is not
    counted. It is hit by every legacy (NULL-version) step message whose index names
    another step in the current default, and by 0.3-built messages during an upgrade."""
    used = {m.group(1) for path in PACKAGE.rglob("*.py") for m in REASON.finditer(path.read_text())}
    assert "invalid_token" in used and "not_pending" in used  # the scan sees the calls
    unknown = sorted(used - set(REJECTION_REASONS))
    assert not unknown, f"reasons that make the metrics hook raise ValueError: {unknown}"


def test_the_metrics_hook_accepts_the_wrong_version_refusal() -> None:
    """What a worker's rejection hook does with the reason worker/steps.py passes."""
    from saga_worker.metrics.hooks import MetricsHook

    MetricsHook().on_rejected("wrong_version")  # today: ValueError, out of the step task
