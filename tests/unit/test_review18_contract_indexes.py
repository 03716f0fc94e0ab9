"""docs/contract.md describes the schema of this change: the indexes migration 0008 left,
and what the `deadline` column now holds (a scan key rounded up, not the exact deadline).

The contract still listed the nine audit indexes and the checkpoint index on `updated_at`
that 0008 dropped, and called `deadline` the time the attempt counts as stalled.
"""

from __future__ import annotations

from pathlib import Path

from saga_worker.store.tables import audit_logs, checkpoints

DOC = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()


def _indexes_sentence(table: str) -> str:
    """The table's "Indexes ...:" paragraph, from the list after its lead-in."""
    section = DOC.split(f"### `{table}`", 1)[1].split("\n### ", 1)[0]
    paragraph = "\n\nIndexes" + section.split("\n\nIndexes", 1)[1].split("\n\n", 1)[0]
    lead_in, _, listed = " ".join(paragraph.split()).partition("): ")
    return listed if listed else lead_in.split("Indexes:", 1)[1]


def test_the_audit_indexes_listed_are_the_tables() -> None:
    sentence = _indexes_sentence("saga_audit_logs")
    for index in audit_logs.indexes:
        columns = [c.name for c in index.columns]
        shown = f"`{columns[0]}`" if len(columns) == 1 else f"(`{'`, `'.join(columns)}`)"
        assert shown in sentence, (index.name, sentence)
    for dropped in ("(`saga_id`, `timestamp`)", "`step_name`;", "`event_type`;"):
        assert dropped not in sentence


def test_the_checkpoint_indexes_omit_updated_at_and_deadline_is_described_as_rounded() -> None:
    assert "`updated_at`" not in _indexes_sentence("saga_checkpoints")
    assert not any(i.name == "ix_saga_checkpoints_updated_at" for i in checkpoints.indexes)
    row = next(line for line in DOC.splitlines() if line.startswith("| `deadline` |"))
    assert "rounded up" in row
