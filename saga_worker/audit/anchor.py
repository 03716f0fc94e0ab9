"""Anchors: a digest of every saga's chain head, kept apart from the chains it covers.

A hash chain shows an edited or removed row, but not a saga deleted whole or its newest rows
cut off (what is left is still a valid chain). An anchor records, for every saga, how many
audit rows it had and the hash of its last one, as a Merkle root with the counts, appended
to `saga_audit_anchors` (chained, append-only) and printed, heads included, for storage
elsewhere. `verify_anchor` later reports each saga or row missing since then.

Format "saga_worker anchor v1" (docs/audit.md#anchors):
- leaf = SHA-256(0x00 || UTF-8 of the compact JSON array [saga_id, rows, head]);
- node = SHA-256(0x01 || left || right); an odd node moves up unchanged; leaves sorted by
  saga_id (code points); the root of no leaves is SHA-256 of nothing;
- anchor hash = SHA-256 of the compact, key-sorted JSON of created_at, sagas, rows, root,
  prev_hash; the first anchor's prev_hash is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from ..errors import ConcurrencyConflict
from ..store.tables import anchors_table, audit_logs
from .chain import GENESIS_HASH, iso_utc

FORMAT = "saga_worker anchor v1"
#: SQLSTATE of the anchor chain trigger's refusal (another anchor was appended meanwhile).
_CHAIN_SQLSTATE = "23SW1"


@dataclass(frozen=True)
class Head:
    """One saga's chain at anchor time: its row count and last row's hash."""

    saga_id: str
    rows: int
    head: str


def _compact(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def merkle_root(heads: Iterable[Head]) -> str:
    """The Merkle root of the heads, sorted by saga_id."""
    level = [
        hashlib.sha256(b"\x00" + _compact([h.saga_id, h.rows, h.head])).digest()
        for h in sorted(heads, key=lambda h: h.saga_id)
    ]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        paired = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    return level[0].hex()


@dataclass(frozen=True)
class Anchor:
    """An anchor as stored (without heads) and printed (with them)."""

    id: int | None
    created_at: datetime
    sagas: int
    rows: int
    root: str
    prev_hash: str
    hash: str
    heads: tuple[Head, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "created_at": iso_utc(self.created_at),
            "sagas": self.sagas,
            "rows": self.rows,
            "root": self.root,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "heads": [[h.saga_id, h.rows, h.head] for h in self.heads],
        }


def anchor_hash(created_at: datetime, sagas: int, rows: int, root: str, prev_hash: str) -> str:
    """The hash that chains an anchor to the previous one."""
    body = {
        "created_at": iso_utc(created_at),
        "sagas": sagas,
        "rows": rows,
        "root": root,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_compact(body)).hexdigest()


def chain_heads(conn: Connection) -> list[Head]:
    """Every saga's row count and last hash, read in one statement (one snapshot)."""
    last = (
        select(
            audit_logs.c.saga_id,
            func.count().label("n"),
            func.max(audit_logs.c.id).label("last_id"),
        )
        .group_by(audit_logs.c.saga_id)
        .subquery()
    )
    rows = conn.execute(
        select(last.c.saga_id, last.c.n, audit_logs.c.hash).join(
            audit_logs, audit_logs.c.id == last.c.last_id
        )
    )
    return sorted((Head(str(r[0]), int(r[1]), str(r[2])) for r in rows), key=lambda h: h.saga_id)


def latest_anchor_time(engine: Engine) -> datetime | None:
    """When the newest anchor was made, or None when there is none."""
    with engine.connect() as conn:
        value = conn.execute(
            select(anchors_table.c.created_at).order_by(anchors_table.c.id.desc()).limit(1)
        ).scalar()
    return value if isinstance(value, datetime) else None


def make_anchor(engine: Engine, now: datetime, attempts: int = 5) -> Anchor:
    """Digest every chain head and append the anchor; returns it, heads included."""
    for _ in range(attempts):
        with engine.connect() as conn:
            heads = chain_heads(conn)
        root = merkle_root(heads)
        rows = sum(h.rows for h in heads)
        try:
            with engine.begin() as conn:
                prev = conn.execute(
                    select(anchors_table.c.hash).order_by(anchors_table.c.id.desc()).limit(1)
                ).scalar()
                prev_hash = str(prev) if prev else GENESIS_HASH
                digest = anchor_hash(now, len(heads), rows, root, prev_hash)
                conn.execute(
                    insert(anchors_table).values(
                        created_at=now,
                        sagas=len(heads),
                        rows=rows,
                        root=root,
                        prev_hash=prev_hash,
                        hash=digest,
                    )
                )
                anchor_id = conn.execute(
                    select(anchors_table.c.id).where(anchors_table.c.hash == digest)
                ).scalar_one()
        except IntegrityError as exc:
            if getattr(exc.orig, "sqlstate", None) != _CHAIN_SQLSTATE:
                raise
            continue  # another anchor was appended meanwhile: chain onto it
        return Anchor(int(anchor_id), now, len(heads), rows, root, prev_hash, digest, tuple(heads))
    raise ConcurrencyConflict(f"the anchor chain kept moving ({attempts} attempts)")


class AnchorFileError(ValueError):
    """The anchor file is not a readable anchor: it cannot stand for anything."""


def parse_anchor(data: Mapping[str, Any]) -> Anchor:
    """An anchor as printed by `saga-worker audit anchor`; AnchorFileError when malformed."""
    try:
        if data["format"] != FORMAT:
            raise AnchorFileError(f"not a {FORMAT!r} file (format {data['format']!r})")
        heads = tuple(Head(str(s), int(n), str(h)) for s, n, h in data["heads"])
        return Anchor(
            None if data.get("id") is None else int(data["id"]),
            datetime.fromisoformat(str(data["created_at"])),
            int(data["sagas"]),
            int(data["rows"]),
            str(data["root"]),
            str(data["prev_hash"]),
            str(data["hash"]),
            heads,
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, AnchorFileError):
            raise
        raise AnchorFileError(f"malformed anchor file: {exc!r}") from exc


@dataclass(frozen=True)
class AnchorProblem:
    """One thing the database lacks (or the file gets wrong) compared with an anchor."""

    kind: str  # anchor_file, anchor_missing, saga_missing, rows_missing, head_changed
    saga_id: str | None
    problem: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "saga_id": self.saga_id, "problem": self.problem}


def verify_anchor(engine: Engine, anchor: Anchor) -> list[AnchorProblem]:
    """Each saga or row the anchor covers that the database no longer has as anchored."""
    problems: list[AnchorProblem] = []
    own = anchor_hash(anchor.created_at, anchor.sagas, anchor.rows, anchor.root, anchor.prev_hash)
    if (
        merkle_root(anchor.heads) != anchor.root
        or own != anchor.hash
        or len(anchor.heads) != anchor.sagas
        or sum(h.rows for h in anchor.heads) != anchor.rows
    ):
        problems.append(
            AnchorProblem(
                "anchor_file",
                None,
                "the file's heads, counts or hash do not give its root and hash: the file was "
                "edited; use a copy from write-once storage",
            )
        )
    with engine.connect() as conn:
        stored = conn.execute(
            select(anchors_table.c.id).where(anchors_table.c.hash == anchor.hash)
        ).scalar()
        if stored is None:
            problems.append(
                AnchorProblem(
                    "anchor_missing",
                    None,
                    f"no anchor with hash {anchor.hash} in saga_audit_anchors (made on another "
                    "database, or the table was rewritten)",
                )
            )
        for head in anchor.heads:
            problems.extend(_check_head(conn, head))
    return problems


def _check_head(conn: Connection, head: Head) -> Sequence[AnchorProblem]:
    count = conn.execute(
        select(func.count()).select_from(audit_logs).where(audit_logs.c.saga_id == head.saga_id)
    ).scalar_one()
    if count == 0:
        return [
            AnchorProblem(
                "saga_missing",
                head.saga_id,
                f"saga {head.saga_id} had {head.rows} audit rows at the anchor; it has none now",
            )
        ]
    if count < head.rows:
        return [
            AnchorProblem(
                "rows_missing",
                head.saga_id,
                f"saga {head.saga_id} had {head.rows} audit rows at the anchor; it has {count}",
            )
        ]
    at = conn.execute(
        select(audit_logs.c.hash)
        .where(audit_logs.c.saga_id == head.saga_id)
        .order_by(audit_logs.c.id)
        .offset(head.rows - 1)
        .limit(1)
    ).scalar_one()
    if at != head.head:
        return [
            AnchorProblem(
                "head_changed",
                head.saga_id,
                f"row {head.rows} of saga {head.saga_id} has hash {at}, the anchor recorded "
                f"{head.head}: rows were removed, replaced or reordered",
            )
        ]
    return []
