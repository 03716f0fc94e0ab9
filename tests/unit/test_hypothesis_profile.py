"""The hypothesis profile tests/conftest.py loads: derandomized wherever services are required."""

from __future__ import annotations

from hypothesis import settings

from tests.requirements import services_required


def test_examples_are_the_same_every_run_under_the_test_command_and_ci() -> None:
    # scripts/test.sh sets SAGA_TEST_REQUIRE_SERVICES and CI sets CI: there a property test
    # checks the same examples every run; elsewhere hypothesis explores (and remembers).
    loaded = settings.default
    assert loaded is not None
    assert loaded.derandomize is services_required()
    if services_required():
        assert loaded.database is None
        assert loaded.max_examples >= 200
        assert loaded.deadline is None
