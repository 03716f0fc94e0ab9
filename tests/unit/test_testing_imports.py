"""A user's unit test of a saga definition needs neither a broker nor a database library.

Each check runs in a fresh interpreter: it imports saga_worker.testing, runs a saga through
the harness (recovery sweep and golden replay included), and lists the heavy modules loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import saga_worker.testing as t
    from saga_worker import SagaDefinition, Step

    h = t.SagaTestHarness(SagaDefinition("imports", [Step("only", lambda call: {"ok": 1})]))
    h.start({})
    h.run_until_settled()
    h.recover()
    assert h.saga.state.value == "COMPLETED" and h.verify_audit() == []
    heavy = ("celery", "kombu", "sqlalchemy", "psycopg", "alembic", "prometheus_client")
    print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
    """
)


def loaded_heavy_modules() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_no_broker_library_is_imported() -> None:
    assert loaded_heavy_modules() & {"celery", "kombu", "prometheus_client"} == set()


def test_no_database_library_is_imported() -> None:
    assert loaded_heavy_modules() & {"sqlalchemy", "psycopg", "alembic"} == set()
