"""Keep the test process's embedded defaults out of the user's home directory."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("SAGA_HOME", tempfile.mkdtemp(prefix="saga-tests-home-"))

# Under the test command and CI, hypothesis draws the same examples every run: a failure
# there is reproducible, never a different sample each time. Locally it explores freely.
if os.environ.get("CI") or os.environ.get("SAGA_TEST_REQUIRE_SERVICES"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    settings.load_profile("ci")
