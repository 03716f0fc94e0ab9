"""The README's first command: `saga-worker demo` on the embedded default, no server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_demo_runs_three_sagas_on_sqlite_and_the_filesystem_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's data folder lands here and must be removed
    script = shutil.which("saga-worker", path=str(Path(sys.executable).parent))
    assert script, "the console script saga-worker is not installed in this venv"
    done = subprocess.run(
        [script, "demo"], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "SQLite" in out and "filesystem broker" in out
    assert "== demo-complete: completes -> COMPLETED" in out
    assert "== demo-compensate: fails at save_results and is compensated -> COMPENSATED" in out
    assert "== demo-flaky: retries a flaky step, then completes -> COMPLETED" in out
    for event in (
        "saga_start",
        "step_retry",
        "step_failed",
        "compensation_complete",
        "saga_compensated",
        "saga_complete",
    ):
        assert event in out
    # it stops its worker and removes its temporary folder
    assert not list(tmp_path.glob("saga-demo-*"))
