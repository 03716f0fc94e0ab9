"""What a test needs from the machine: missing in CI is a failure, elsewhere a skip."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Fail when running in CI (a missing service there is a broken set-up), else skip."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """A program from Debian's prometheus package, which scripts/test.sh installs."""
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} not found: scripts/test.sh installs Debian's prometheus package")
