"""What a test needs from the machine: missing in CI is a failure, elsewhere a skip."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def services_required() -> bool:
    """scripts/test.sh starts every service and says so; CI runs it. Anywhere else (a bare
    `pytest tests/unit`) a missing service is a skip."""
    return bool(os.environ.get("SAGA_TEST_REQUIRE_SERVICES") or os.environ.get("CI"))


def unavailable(message: str) -> NoReturn:
    """Fail under the test command or CI (a missing service there is a broken set-up),
    else skip."""
    if services_required():
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """A program from Debian's prometheus package, which scripts/test.sh installs."""
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} not found: scripts/test.sh installs Debian's prometheus package")
