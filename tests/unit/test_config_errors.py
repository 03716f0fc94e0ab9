"""A configuration problem exits with the configuration code (6) and one line naming the
SAGA_* variable to fix, through the real `saga-worker` console script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from saga_worker.cli._output import EXIT_CONFIG, EXIT_INTERNAL, exit_code_for
from saga_worker.errors import ConfigurationError
from tests.console_script import run_cli


def run(args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(args, env, home)


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["list"], {"SAGA_RECOVERY_INTERVAL_SECONDS": "abc"}, "SAGA_RECOVERY_INTERVAL_SECONDS"),
        (["list"], {"SAGA_MAX_RECOVERIES": "-1"}, "SAGA_MAX_RECOVERIES"),
        (["list"], {"SAGA_MAX_RECOVERIES": "101"}, "SAGA_MAX_RECOVERIES"),
        (["list"], {"SAGA_METRICS_DIR": "relative/metrics"}, "SAGA_METRICS_DIR"),
        (["list"], {"SAGA_DATABASE_URL": "mysql://u:pw-x1@db/sagas"}, "SAGA_DATABASE_URL"),
        (["list", "--json"], {"SAGA_DATABASE_URL": "no url at all"}, "SAGA_DATABASE_URL"),
        (["status", "s1"], {"SAGA_DATABASE_URL": "postgresql+nodriver://u:pw-x1@h/d"}, "driver"),
        (["db", "upgrade", "--sql"], {"SAGA_DATABASE_URL": "oracle://u:pw-x1@h/d"}, "oracle"),
        (["worker"], {"SAGA_IMPORTS": "no_such_module_x"}, "SAGA_IMPORTS"),
        (
            ["start", "backtest_workflow", "--context", "{}"],
            {"SAGA_IMPORTS": "no_such_module_x"},
            "no_such_module_x",
        ),
        (
            ["start", "backtest_workflow"],
            {"SAGA_BROKER_URL": "nosuchtransport://u:pw-x1@h/0"},
            "SAGA_BROKER_URL",
        ),
        (["worker"], {"SAGA_IMPORTS": "saga_worker.no_such_sub"}, "SAGA_IMPORTS"),
        (["worker"], {"SAGA_CELERY_CONFIG": "nonexistent_mod_x"}, "SAGA_CELERY_CONFIG"),
        (["beat"], {"SAGA_CELERY_CONFIG": "nonexistent_mod_x"}, "SAGA_CELERY_CONFIG"),
        (["worker"], {"SAGA_BROKER_URL": "redsi://u:pw-x1@x/0"}, "SAGA_BROKER_URL"),
        (["beat"], {"SAGA_BROKER_URL": "redsi://x"}, "SAGA_BROKER_URL"),
        (
            ["status", "x"],
            {"SAGA_DATABASE_URL": "postgresql+psycopg://u:pw-x1@h:abc/db"},
            "SAGA_DATABASE_URL",
        ),
        (
            ["db", "current"],
            {"SAGA_DATABASE_URL": "postgresql+psycopg://u:pw-x1@h:abc/db"},
            "port",
        ),
    ],
)
def test_configuration_errors_exit_6_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], names: str
) -> None:
    result = run(args, env, tmp_path)
    assert result.returncode == EXIT_CONFIG == 6, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0]
    assert "Traceback" not in result.stderr and "pw-x1" not in result.stderr
    if "--json" in args:
        assert '"exit_code": 6' in result.stdout and '"configuration_error"' in result.stdout


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_celery_config_setting_a_pinned_setting_is_refused_before_celery_starts(
    tmp_path: Path, command: str
) -> None:
    (tmp_path / "pinned_celery_cfg_x.py").write_text(
        "task_serializer = 'pickle'\nbroker_pool_limit = 3\n"
    )
    env = {"SAGA_CELERY_CONFIG": "pinned_celery_cfg_x", "PYTHONPATH": str(tmp_path)}
    result = run([command], env, tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: SAGA_CELERY_CONFIG='pinned_celery_cfg_x' sets task_serializer")


def test_unreachable_broker_is_unavailable_not_internal(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there.
    env = {"SAGA_BROKER_URL": "redis://:pw-x1@127.0.0.1:1/0"}
    result = run(["start", "backtest_workflow", "--json"], env, tmp_path)
    assert result.returncode == 5, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the broker at redis://:**@127.0.0.1:1/0")
    assert "pw-x1" not in result.stdout + result.stderr
    assert '"broker_unavailable"' in result.stdout


def test_configuration_error_maps_to_its_own_code() -> None:
    assert exit_code_for(ConfigurationError("x")) == EXIT_CONFIG
    assert exit_code_for(ModuleNotFoundError("x")) == EXIT_INTERNAL


def test_help_lists_the_configuration_exit_code(tmp_path: Path) -> None:
    result = run(["--help"], {}, tmp_path)
    assert result.returncode == 0
    assert "6 configuration error" in " ".join(result.stdout.split())
