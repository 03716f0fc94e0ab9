"""docs/testing.md stays true: its example runs, its golden file replays, its API is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import saga_worker.testing
from saga_worker.core.definition import SagaDefinition
from saga_worker.testing import UPDATE_ENV, SagaTestHarness, check_golden

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", TEXT, flags=re.DOTALL)


def example_module() -> dict[str, Any]:
    [code] = [code for lang, code in BLOCKS if code.startswith("# tests/test_place_order.py")]
    namespace: dict[str, Any] = {"__name__": "docs_testing_example"}
    exec(compile(code, f"{DOC}:example", "exec"), namespace)
    return namespace


EXAMPLE = example_module()
EXAMPLE_TESTS = sorted(name for name in EXAMPLE if name.startswith("test_"))


def test_the_example_has_tests() -> None:
    assert len(EXAMPLE_TESTS) == 4


@pytest.mark.parametrize("name", EXAMPLE_TESTS)
def test_example_from_the_docs(name: str) -> None:
    EXAMPLE[name]()


def test_the_golden_file_of_the_docs_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [text] = [code for lang, code in BLOCKS if lang == "json"]
    path = tmp_path / "place_order.json"
    path.write_text(text)
    definitions: dict[str, SagaDefinition] = {"place_order": EXAMPLE["place_order"]}
    monkeypatch.setenv(UPDATE_ENV, "1")
    check_golden(path, definitions)
    monkeypatch.delenv(UPDATE_ENV)
    check_golden(path, definitions)
    last = json.loads(path.read_text())["transitions"][-1]["expect"]
    assert [(a["event_type"], a["step_name"]) for a in last["audit"]] == [
        ("step_failed", "book_trade"),
        ("compensation_start", "reserve_funds"),
    ]


def test_every_public_name_is_documented() -> None:
    assert [name for name in saga_worker.testing.__all__ if name not in TEXT] == []
    methods = [name for name in dir(SagaTestHarness) if not name.startswith("_")]
    assert [name for name in methods if not re.search(rf"`{name}\b|\b{name}\(", TEXT)] == []
