"""Keep the test process's embedded defaults out of the user's home directory."""

from __future__ import annotations

import os
import tempfile

from tests.requirements import services_required

os.environ.setdefault("SAGA_HOME", tempfile.mkdtemp(prefix="saga-tests-home-"))

# Under the test command and CI, hypothesis draws the same examples every run: a failure
# there is reproducible, never a different sample each time. Locally it explores freely.
# Being the same every run, the examples had better be many: 200 where a test does not say
# (tests that do keep their own count), and no deadline (a loaded CI machine is no failure).
if services_required():
    from hypothesis import settings

    settings.register_profile(
        "ci", derandomize=True, database=None, print_blob=True, max_examples=200, deadline=None
    )
    settings.load_profile("ci")
