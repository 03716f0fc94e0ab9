"""worker_soft_shutdown_timeout: sized from the longest local step or compensation the
worker runs (hard time limit included), remote steps excluded, an explicit value kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from saga_worker import Remote, SagaDefinition, Step
from saga_worker.config import Settings
from saga_worker.worker.dispatch import HARD_LIMIT_MARGIN_SECONDS
from saga_worker.worker.shutdown import longest_local_step_seconds, size_soft_shutdown

MARGIN = HARD_LIMIT_MARGIN_SECONDS


def noop(call: Any) -> None:
    return None


def test_longest_local_step_counts_compensations_and_defaults() -> None:
    short = SagaDefinition("short", [Step("a", noop, timeout_seconds=5)])
    assert longest_local_step_seconds([short], 300) == 5 + MARGIN
    slow_undo = SagaDefinition(
        "slow_undo",
        [Step("a", noop, compensate=noop, timeout_seconds=5, compensation_timeout_seconds=90)],
    )
    assert longest_local_step_seconds([short, slow_undo], 300) == 90 + MARGIN
    saga_default = SagaDefinition("d", [Step("a", noop)], default_timeout_seconds=45)
    assert longest_local_step_seconds([saga_default], 300) == 45 + MARGIN
    engine_default = SagaDefinition("e", [Step("a", noop)])
    assert longest_local_step_seconds([engine_default], 120) == 120 + MARGIN


def test_remote_steps_do_not_hold_up_a_local_shutdown() -> None:
    remote = SagaDefinition(
        "remote",
        [
            Step(
                "quote",
                Remote("svc.quote", queue="svc"),
                compensate=Remote("svc.unquote", queue="svc"),
                timeout_seconds=3600,
            ),
            Step("local", noop, timeout_seconds=20),
        ],
    )
    assert longest_local_step_seconds([remote], 300) == 20 + MARGIN
    only_remote = SagaDefinition("r", [Step("q", Remote("svc.q", queue="svc"))])
    assert longest_local_step_seconds([only_remote], 300) == 0.0


def test_an_explicit_setting_is_kept() -> None:
    definition = SagaDefinition("x", [Step("a", noop, timeout_seconds=7)])
    app = Celery(set_as_current=False)
    size_soft_shutdown(app, [definition], 300)
    assert app.conf.worker_soft_shutdown_timeout == 7 + MARGIN
    app = Celery(set_as_current=False)
    app.conf.worker_soft_shutdown_timeout = 3
    size_soft_shutdown(app, [definition], 300)
    assert app.conf.worker_soft_shutdown_timeout == 3


def test_the_app_sizes_it_from_the_imported_sagas(tmp_path: Path) -> None:
    from saga_worker import registry
    from saga_worker.worker.app import create_app

    settings = Settings.from_env(
        {"SAGA_HOME": str(tmp_path), "SAGA_IMPORTS": "saga_worker.examples"}
    )
    app = create_app(settings)
    expected = longest_local_step_seconds(
        registry.all_definitions(), settings.default_step_timeout_seconds
    )
    assert app.conf.worker_soft_shutdown_timeout == expected >= 30 + MARGIN


def test_saga_celery_config_wins(tmp_path: Path, monkeypatch: Any) -> None:
    from saga_worker.worker.app import create_app

    (tmp_path / "shutdown_conf_x1.py").write_text("worker_soft_shutdown_timeout = 600.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = Settings.from_env(
        {
            "SAGA_HOME": str(tmp_path),
            "SAGA_IMPORTS": "saga_worker.examples",
            "SAGA_CELERY_CONFIG": "shutdown_conf_x1",
        }
    )
    assert create_app(settings).conf.worker_soft_shutdown_timeout == 600.0
