"""The real `saga-worker` console script of this venv, run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAGA_WORKER = str(Path(sys.executable).with_name("saga-worker"))


def run_cli(
    args: list[str], env: dict[str, str], home: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Only the SAGA_* variables given reach it; it runs in `home`, not in the repository,
    so the installed package (migrations included) is what runs."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run(
        [SAGA_WORKER, *args],
        env={**clean, "SAGA_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home,
    )
