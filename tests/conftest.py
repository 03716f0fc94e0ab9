"""Keep the test process's embedded defaults out of the user's home directory."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("SAGA_HOME", tempfile.mkdtemp(prefix="saga-tests-home-"))
