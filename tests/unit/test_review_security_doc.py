"""Review of issue 14: docs/security.md still lists as "Not implemented yet" what this change
implements (a key required with PostgreSQL, and a fingerprint a mismatched process is
refused against), contradicting its own paragraph above and the code (store/keyring.py)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_security_doc_does_not_call_the_key_rules_unimplemented() -> None:
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    stale = "Not implemented yet: refusing to start on PostgreSQL without a configured key"
    assert stale not in text
