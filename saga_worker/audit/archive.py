"""The audit trail as an auditor gets it: a saga's timeline, export files, verification.

`AuditArchive` reads the saga database through the store (one snapshot per export or
verification, rows from a server-side cursor, so memory stays flat in the number of rows),
writes an export with its manifest beside it, and checks every hash, link and checkpoint
head. `verify_export_file` checks an export offline against its manifest, with no database.
Database failures surface as `DatabaseUnavailable` (store/failures.py), bad arguments as
`InvalidFilter`; the CLI's `audit` commands only print what these return.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InvalidFilter, SagaNotFound
from ..requests import check_time_range
from ..store.failures import database_errors
from ..store.queries import AuditQuery
from ..store.repository import SagaStore
from .chain import AUDIT_HASH_SPEC, LEGACY_HASH_SPEC, iso_utc
from .export import EXPORT_COLUMNS, EXPORT_FORMATS, ExportWriter, manifest_path, open_export
from .verify import (
    FILE_MISMATCH,
    MALFORMED,
    MISSING_ROWS,
    MISSING_TAIL,
    ChainProblem,
    ChainVerifier,
    describe_tail,
)

#: Told (rows done, rows in all or None when unknown) every 1000 rows and at the end.
ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Timeline:
    """A saga's audit rows (already redacted when written) and the state of its chain."""

    saga_id: str
    rows: list[dict[str, Any]]
    problems: list[ChainProblem]


@dataclass(frozen=True)
class ExportResult:
    """A finished export: where, how many rows, the file's SHA-256 and its manifest."""

    path: str
    fmt: str
    rows: int
    sagas: int
    sha256: str
    manifest: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.fmt,
            "rows": self.rows,
            "sagas": self.sagas,
            "sha256": self.sha256,
            "manifest": self.manifest,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `audit verify`: `ok` only when no problem was found."""

    source: str
    rows: int
    sagas: int
    problems: list[ChainProblem]
    notes: list[str] = field(default_factory=list)
    #: Rows hashed under v1 (`LEGACY_HASH_SPEC`), written before hash v2.
    legacy_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "rows": self.rows,
            "sagas": self.sagas,
            "problems": [p.as_dict() for p in self.problems],
            "notes": self.notes,
            "legacy_rows": self.legacy_rows,
        }


class AuditArchive:
    """Timeline, export and verification of the audit rows in one saga database.

    `safe_url` is the database URL with its password masked (it names the database in
    reports and errors); `clock` stamps export manifests.
    """

    def __init__(self, store: SagaStore, safe_url: str, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.safe_url = safe_url
        self.clock = clock

    def timeline(self, saga_id: str) -> Timeline:
        """A saga's audit rows in order and what verification found in them."""
        report = self.verify(saga_id)
        with database_errors(self.safe_url):
            rows, _ = self.store.saga_chain(saga_id)
        return Timeline(saga_id, rows, report.problems)

    def export(
        self,
        fmt: str,
        *,
        path: str | os.PathLike[str] | None = None,
        stream: BinaryIO | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        saga_type: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> ExportResult:
        """Stream audit rows (every column, hashes included) to a file or a binary stream.

        Memory stays flat in the number of rows: rows come from a server-side cursor and
        are written one by one. A file gets a `<file>.manifest.json` beside it (filters, row
        count, SHA-256 of the file, and each exported saga's checkpoint head when the export
        runs to the present) so that it verifies offline, including a truncated tail.
        """
        if fmt not in EXPORT_FORMATS:
            raise InvalidFilter(f"unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
        if (path is None) == (stream is None):
            raise ValueError("give exactly one of path and stream")
        check_time_range(since, until)
        query = AuditQuery(since=since, until=until, saga_type=saga_type)
        target = Path(path) if path is not None else None
        partial = target.with_name(target.name + ".partial") if target else None
        out: BinaryIO
        if partial is not None:
            try:
                out = partial.open("wb")
            except OSError as exc:
                raise InvalidFilter(f"cannot write {target}: {exc.strerror}") from None
        else:
            assert stream is not None
            out = stream
        tails: dict[str, str] = {}
        heads: dict[str, str] | None = None
        try:
            writer = ExportWriter(out, fmt)
            with database_errors(self.safe_url), self.store.audit_snapshot() as reader:
                total = reader.count(query) if progress else None
                for row in reader.rows(query):
                    writer.write(row)
                    tails[row["saga_id"]] = row["hash"]
                    if progress and writer.rows % 1000 == 0:
                        progress(writer.rows, total)
                if until is None:
                    heads = {
                        saga_id: head
                        for saga_id, head in reader.heads(saga_type)
                        if saga_id in tails
                    }
            if progress:
                progress(writer.rows, total)
            out.flush()
            if partial is not None:
                os.fsync(out.fileno())
        finally:
            if partial is not None:
                out.close()
        manifest = None
        if target is not None and partial is not None:
            partial.replace(target)
            manifest_file = manifest_path(target)
            manifest_file.write_text(
                json.dumps(
                    {
                        "kind": "saga_worker audit export",
                        "format": fmt,
                        "columns": list(EXPORT_COLUMNS),
                        "rows": writer.rows,
                        "sagas": len(tails),
                        "sha256": writer.sha256,
                        "exported_at": iso_utc(self.clock()),
                        "since": iso_utc(since) if since else None,
                        "until": iso_utc(until) if until else None,
                        "saga_type": saga_type,
                        # Names the definition instead of pointing at a document, so the
                        # manifest stays meaningful wherever the export is archived.
                        "hash": AUDIT_HASH_SPEC,
                        # Rows written before v2 keep their v1 hashes.
                        "legacy_hash": LEGACY_HASH_SPEC,
                        "heads": heads,
                    },
                    indent=1,
                    sort_keys=True,
                )
                + "\n",
                encoding="utf-8",
            )
            manifest = str(manifest_file)
        return ExportResult(
            path=str(target) if target else "-",
            fmt=fmt,
            rows=writer.rows,
            sagas=len(tails),
            sha256=writer.sha256,
            manifest=manifest,
        )

    def verify(
        self, saga_id: str | None = None, progress: ProgressCallback | None = None
    ) -> VerifyReport:
        """Check every hash, every link, and each saga's last row against its checkpoint."""
        if saga_id is not None:
            return self._verify_one(saga_id)
        verifier = ChainVerifier()
        mismatched: list[str] = []
        with database_errors(self.safe_url), self.store.audit_snapshot() as reader:
            total = reader.count(AuditQuery()) if progress else None
            for row in reader.rows(AuditQuery()):
                verifier.add(row)
                if progress and verifier.rows % 1000 == 0:
                    progress(verifier.rows, total)
            for sid, head in reader.heads():
                if not verifier.check_head(sid, head):
                    mismatched.append(sid)
        if progress:
            progress(verifier.rows, total)
        verifier.check_orphans()
        problems = verifier.problems
        if mismatched:
            # Re-read each such saga in one transaction: on SQLite the scan is not one
            # snapshot, so a saga that moved on meanwhile must not be reported.
            again = set(mismatched)
            kept = [
                p
                for p in problems
                if not (p.saga_id in again and p.kind in (MISSING_TAIL, MISSING_ROWS))
            ]
            for sid in mismatched:
                kept.extend(
                    p
                    for p in self._verify_one(sid).problems
                    if p.kind in (MISSING_TAIL, MISSING_ROWS)
                )
            problems = kept
        return VerifyReport(
            "database " + self.safe_url,
            verifier.rows,
            verifier.sagas,
            problems,
            _legacy_note(verifier),
            verifier.legacy_rows,
        )

    def _verify_one(self, saga_id: str) -> VerifyReport:
        with database_errors(self.safe_url):
            rows, head = self.store.saga_chain(saga_id)
        if not rows and head is None:
            raise SagaNotFound(saga_id)
        verifier = ChainVerifier()
        for row in rows:
            verifier.add(row)
        if head is None:
            verifier.check_orphans()
        elif not verifier.check_head(saga_id, head) and rows:
            last = verifier.problems[-1]
            verifier.problems[-1] = replace(last, problem=describe_tail(rows, head))
        return VerifyReport(
            f"saga {saga_id} in database {self.safe_url}",
            verifier.rows,
            verifier.sagas,
            verifier.problems,
            _legacy_note(verifier),
            verifier.legacy_rows,
        )


def _legacy_note(verifier: ChainVerifier) -> list[str]:
    if not verifier.legacy_rows:
        return []
    return [
        f"{verifier.legacy_rows} row(s) written before audit hash v2 verified under "
        "v1 (docs/audit.md, Hash definition)"
    ]


def verify_export_file(
    path: str | os.PathLike[str], progress: ProgressCallback | None = None
) -> VerifyReport:
    """Verify an export file alone (no database needed): chain, and manifest when present."""
    source = Path(path)
    if not source.is_file():
        raise InvalidFilter(f"no export file at {source}")
    notes: list[str] = []
    manifest: dict[str, Any] | None = None
    manifest_file = manifest_path(source)
    if manifest_file.is_file():
        try:
            loaded = json.loads(manifest_file.read_text(encoding="utf-8"))
            manifest = loaded if isinstance(loaded, dict) else None
        except ValueError:
            manifest = None
        if manifest is None:
            notes.append(f"manifest {manifest_file} is unreadable; only the rows were checked")
    else:
        notes.append(
            f"no manifest ({manifest_file.name}) beside the file: its digest, row count and "
            "saga heads were not checked, so a truncated end would go unnoticed"
        )
    partial = bool(manifest and manifest.get("since"))
    verifier = ChainVerifier(partial_chains=partial, check_order=True)

    def malformed(line: int, message: str) -> None:
        verifier.report(ChainProblem("", None, message, MALFORMED))

    export = open_export(source, malformed)
    for record in export.rows:
        verifier.add(record)
        if progress and verifier.rows % 1000 == 0:
            progress(verifier.rows, manifest.get("rows") if manifest else None)
    if progress:
        progress(verifier.rows, verifier.rows)
    if manifest is not None:
        if manifest.get("rows") != verifier.rows:
            verifier.report(
                ChainProblem(
                    "",
                    None,
                    f"the manifest lists {manifest.get('rows')} rows but the file holds "
                    f"{verifier.rows}: rows were added to or removed from the file",
                    FILE_MISMATCH,
                )
            )
        if manifest.get("sha256") != export.sha256:
            verifier.report(
                ChainProblem(
                    "",
                    None,
                    "the file's SHA-256 is not the one in its manifest: the file was changed "
                    "after export",
                    FILE_MISMATCH,
                )
            )
        heads = manifest.get("heads")
        if isinstance(heads, dict):
            for saga_id, head in heads.items():
                verifier.check_head(str(saga_id), str(head))
            verifier.check_orphans()
        elif not manifest.get("until"):
            notes.append("the manifest has no saga heads: a deleted last row is not detectable")
        if partial:
            notes.append(
                f"export starts at {manifest.get('since')}: each saga's first row in the file "
                "is taken as the anchor of its chain"
            )
    notes.extend(_legacy_note(verifier))
    return VerifyReport(
        f"file {source}",
        verifier.rows,
        verifier.sagas,
        verifier.problems,
        notes,
        verifier.legacy_rows,
    )
