"""A user's install: the wheel, without extras, in a new venv, used from outside the repo.

The test command installs the `dev` extra into .venv, whose tools bring packages a user's
plain `pip install saga_worker` does not get; this test is what catches a dependency that
only the dev extra provides.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.requirements import unavailable

REPO = Path(__file__).resolve().parents[2]
# A file outside the repository (split so that this line does not name it).
OUTSIDE = re.compile("|".join(re.escape(p) for p in (".." + "/shared", "shared" + "/DESIGN")))


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)], out, env)
    (built,) = out.glob("saga_worker-*.whl")
    return built


def test_the_wheel_carries_migrations_and_points_nowhere_outside_itself(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "saga_worker/migrations/env.py" in names
        assert any(n.startswith("saga_worker/migrations/versions/0001") for n in names)
        assert "saga_worker/py.typed" in names
        for name in names:
            text = archive.read(name).decode("utf-8", errors="replace")
            assert OUTSIDE.search(text) is None, name


def test_a_plain_install_runs_the_cli_the_app_and_the_demo(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    # Nothing of the test run's environment may leak in: no SAGA_* settings, no PYTHONPATH.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp_path)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env, timeout=600)
    listed = _run([str(python), "-m", "pip", "list", "--format=freeze"], tmp_path, env)
    packages = sorted(line.split("==")[0].lower() for line in listed.split())
    print(f"\nclean install: {len(packages)} packages: {' '.join(packages)}")
    assert "flower" not in packages and "pytest" not in packages, packages

    # Run from a folder that is not the repository: the installed package is what runs.
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert "Usage:" in _run([str(bin_dir / "saga-worker"), "--help"], work, env)
    _run([str(python), "-c", "import saga_worker.app"], work, env)
    _run([str(python), "-m", "celery", "-A", "saga_worker.app", "report"], work, env)
    _run([str(bin_dir / "saga-worker"), "db", "upgrade"], work, env)
    out = _run([str(bin_dir / "saga-worker"), "demo"], work, env)
    assert "== demo-complete: completes -> COMPLETED" in out, out
    assert "== demo-compensate: fails at save_results and is compensated -> COMPENSATED" in out
    assert "== demo-flaky: retries a flaky step, then completes -> COMPLETED" in out


def test_the_readme_demo_command_runs_on_a_fresh_clone(tmp_path: Path) -> None:
    """`bash scripts/demo.sh` exactly as the README says, in a new clone of this commit."""
    if not (REPO / ".git").exists():
        unavailable(f"{REPO} is not a git checkout: this test clones it")
    clone = tmp_path / "clone"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["TMPDIR"] = str(tmp_path)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    _run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path, env)
    # The commit under test may not be committed yet in a developer's tree: CI's always is.
    head = _run(["git", "rev-parse", "HEAD"], REPO, env).strip()
    _run(["git", "checkout", "-q", head], clone, env)
    out = _run(["bash", "scripts/demo.sh"], clone, env, timeout=600)
    assert "== demo-complete: completes -> COMPLETED" in out, out
    assert "== demo-flaky: retries a flaky step, then completes -> COMPLETED" in out
