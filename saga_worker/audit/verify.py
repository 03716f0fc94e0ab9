"""Verification of the hash chain: each row's own hash, its link, and each saga's head.

`ChainVerifier` walks rows in insertion order in memory proportional to the number of sagas,
not rows, and reports every break as a `ChainProblem` whose `kind` scripts can match on. It
reads no database and no file: callers feed it rows (audit/archive.py does both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .chain import GENESIS_HASH, hash_scheme

#: Kinds of `ChainProblem`, so that scripts can tell them apart without parsing text.
MODIFIED = "modified"
BROKEN_LINK = "broken_link"
OUT_OF_ORDER = "out_of_order"
MISSING_TAIL = "missing_tail"
EXTRA_ROWS = "extra_rows"
MISSING_ROWS = "missing_rows"
ORPHAN = "orphan"
MALFORMED = "malformed"
FILE_MISMATCH = "file_mismatch"


@dataclass(frozen=True)
class ChainProblem:
    """One break found by verification: which saga, which row, what is wrong."""

    saga_id: str
    row_id: Any
    problem: str
    kind: str = BROKEN_LINK
    event_type: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "row_id": self.row_id,
            "event_type": self.event_type,
            "kind": self.kind,
            "problem": self.problem,
        }


class _Tail:
    """What the verifier keeps per saga: the last row's hash and id, never the rows."""

    __slots__ = ("hash", "only_rejections", "row_id", "seen_head")

    def __init__(self, hash_: str, row_id: Any, only_rejections: bool) -> None:
        self.hash = hash_
        self.row_id = row_id
        self.only_rejections = only_rejections
        self.seen_head = False


class ChainVerifier:
    """Streaming check of audit rows given in insertion order (by id).

    Memory grows with the number of sagas (one `_Tail` each), not with the number of rows.
    `partial_chains=True` accepts a saga whose first row does not start at the genesis hash
    (an export made with --since starts mid-chain); every later link is still checked.
    `check_order=True` also requires ids to increase (rows read from a file, whose line
    order is not guaranteed by a query).
    """

    def __init__(self, *, partial_chains: bool = False, check_order: bool = False) -> None:
        self.partial_chains = partial_chains
        self.check_order = check_order
        self.tails: dict[str, _Tail] = {}
        self.problems: list[ChainProblem] = []
        self.rows = 0
        #: Rows whose hash matches under the v1 definition (written before v2).
        self.legacy_rows = 0
        self._last_id: Any = None

    @property
    def sagas(self) -> int:
        return len(self.tails)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, row: Mapping[str, Any]) -> None:
        """Check one row against its own hash and against the previous row of its saga."""
        self.rows += 1
        saga_id = str(row.get("saga_id"))
        row_id = row.get("id")
        event_type = row.get("event_type")
        tail = self.tails.get(saga_id)
        if (
            self.check_order
            and row_id is not None
            and self._last_id is not None
            and isinstance(row_id, int)
            and isinstance(self._last_id, int)
            and row_id <= self._last_id
        ):
            self._report(
                saga_id,
                row_id,
                OUT_OF_ORDER,
                f"row id {row_id} comes after id {self._last_id}: rows were reordered",
                event_type,
            )
        if row_id is not None:
            self._last_id = row_id
        scheme = hash_scheme(row)
        if scheme == "v1":
            self.legacy_rows += 1
        elif scheme is None:
            self._report(
                saga_id,
                row_id,
                MODIFIED,
                "hash does not match the row's content: the row was modified",
                event_type,
            )
        prev = row.get("prev_hash")
        if tail is None:
            if prev != GENESIS_HASH and not self.partial_chains:
                self._report(
                    saga_id,
                    row_id,
                    BROKEN_LINK,
                    "prev_hash is not the genesis hash but this is the saga's first row: "
                    "earlier rows were deleted, or this row was inserted or moved",
                    event_type,
                )
        elif prev != tail.hash:
            detail = (
                "prev_hash is the genesis hash but the saga has earlier rows: "
                "this row was inserted or moved"
                if prev == GENESIS_HASH
                else f"prev_hash does not match the previous row of this saga (id {tail.row_id}): "
                "a row was deleted, inserted or moved before it"
            )
            self._report(saga_id, row_id, BROKEN_LINK, detail, event_type)
        rejection = event_type == "saga_rejected"
        if tail is None:
            self.tails[saga_id] = _Tail(str(row.get("hash")), row_id, rejection)
        else:
            tail.hash = str(row.get("hash"))
            tail.row_id = row_id
            tail.only_rejections = tail.only_rejections and rejection

    def check_head(self, saga_id: str, head: str) -> bool:
        """Compare a saga's last row with the head its checkpoint recorded; False on mismatch.

        Only this catches a deleted last row (nothing follows it to break a link) or rows
        appended after the last real one.
        """
        tail = self.tails.get(saga_id)
        if tail is None:
            if head != GENESIS_HASH:
                self._report(
                    saga_id,
                    None,
                    MISSING_ROWS,
                    "the checkpoint records audit rows but none exist: they were all deleted",
                    None,
                )
                return False
            return True
        tail.seen_head = True
        if tail.hash != head:
            self._report(
                saga_id,
                tail.row_id,
                MISSING_TAIL,
                "the saga's last row is not the head its checkpoint recorded: "
                "its last row(s) were deleted, or rows were appended after them",
                None,
            )
            return False
        return True

    def check_orphans(self) -> None:
        """Flag sagas that have rows but no checkpoint head, unless they are only rejections.

        Call after every `check_head`: a rejected start has no checkpoint by design.
        """
        for saga_id, tail in self.tails.items():
            if not tail.seen_head and not tail.only_rejections:
                self._report(
                    saga_id,
                    tail.row_id,
                    ORPHAN,
                    "rows of a saga that has no checkpoint and are not a rejection: "
                    "forged rows, or the checkpoint was deleted",
                    None,
                )

    def report(self, problem: ChainProblem) -> None:
        """Add a problem found outside the chain walk (e.g. a malformed line of a file)."""
        self.problems.append(problem)

    def _report(self, saga_id: str, row_id: Any, kind: str, problem: str, event_type: Any) -> None:
        self.problems.append(
            ChainProblem(
                saga_id, row_id, problem, kind, None if event_type is None else str(event_type)
            )
        )


def verify_chain(rows: Iterable[Mapping[str, Any]]) -> list[ChainProblem]:
    """Check every row's hash and its link to the previous row of the same saga.

    Rows must come in insertion order (by id). Detects a changed row (hash mismatch),
    and a deleted, inserted or reordered row (prev_hash not the previous row's hash).
    A deleted last row needs the checkpoint's head: see `ChainVerifier.check_head`.
    """
    verifier = ChainVerifier()
    for row in rows:
        verifier.add(row)
    return verifier.problems


def describe_tail(rows: Sequence[Mapping[str, Any]], head: str) -> str:
    """Explain a head mismatch from one saga's full chain (read in one transaction)."""
    hashes = [r.get("hash") for r in rows]
    if head in hashes:
        index = hashes.index(head)
        extra = [r.get("id") for r in rows[index + 1 :]]
        return (
            f"rows after the head the checkpoint recorded were inserted (ids {extra}): "
            "forged or appended outside the engine"
        )
    last = rows[-1].get("id") if rows else None
    return (
        f"the head the checkpoint recorded is not among the saga's rows: the row(s) after "
        f"id {last} were deleted, or the last rows were modified"
    )
