"""Which directory a process counts into: a worker's claim on SAGA_METRICS_DIR, and the
hooks an operator process gets. Counting across processes end to end:
tests/integration/test_operator_metrics.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from saga_worker.config import Settings
from saga_worker.errors import ConfigurationError
from saga_worker.metrics.multiprocess import LOCK_FILE, claim_directory
from saga_worker.metrics.serve import _worker_directory, operator_hooks


def test_metrics_dir_is_read_from_the_environment_and_must_be_absolute(tmp_path: Path) -> None:
    env = {"SAGA_HOME": str(tmp_path)}
    assert Settings.from_env(env).metrics_dir is None
    given = tmp_path / "metrics"
    assert Settings.from_env({**env, "SAGA_METRICS_DIR": str(given)}).metrics_dir == given
    with pytest.raises(ConfigurationError, match="SAGA_METRICS_DIR must be an absolute path"):
        Settings.from_env({**env, "SAGA_METRICS_DIR": "metrics"})


def test_one_worker_at_a_time_claims_a_metrics_directory(tmp_path: Path) -> None:
    directory = tmp_path / "shared" / "metrics"
    first = claim_directory(directory)
    assert first is not None
    assert (directory / LOCK_FILE).exists()
    assert not LOCK_FILE.endswith(".db")  # never merged as a metric file
    try:
        assert claim_directory(directory) is None  # a second worker falls back
    finally:
        os.close(first)
    again = claim_directory(directory)
    assert again is not None  # released with its descriptor
    os.close(again)


def test_a_worker_finding_the_directory_claimed_counts_privately(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    settings = Settings.from_env({"SAGA_HOME": str(tmp_path), "SAGA_METRICS_DIR": str(shared)})
    directory, claim = _worker_directory(settings)
    assert (directory, claim is not None) == (str(shared), True)
    assert claim is not None
    try:
        private, second = _worker_directory(settings)
        assert second is None and private != str(shared)
        assert Path(private).is_dir()
        shutil.rmtree(private)
    finally:
        os.close(claim)


def test_operator_hooks_are_empty_without_a_shared_directory(tmp_path: Path) -> None:
    settings = Settings.from_env({"SAGA_HOME": str(tmp_path)})
    assert operator_hooks(settings) == []
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # this process's metrics untouched
