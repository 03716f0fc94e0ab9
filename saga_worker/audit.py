"""Audit rows: redaction, the per-saga SHA-256 hash chain, its verification, and export files."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .core.decision import AuditEvent

GENESIS_HASH = "0" * 64
#: Name, version and summary of `row_hash`, recorded in export manifests (docs/audit.md,
#: "Hash definition"). Change the version whenever the hashed bytes change.
AUDIT_HASH_SPEC = (
    "saga_worker audit hash v1: SHA-256 hex of the UTF-8 bytes of the JSON object of every "
    "column but id and hash (prev_hash included), keys sorted, no whitespace, non-ASCII kept, "
    "timestamp as ISO 8601 UTC with microseconds and +00:00, duration_ms a float; "
    "prev_hash links each saga's rows, 64 zeros for its first"
)
REDACTED = "***REDACTED***"

#: Columns covered by the hash, in no particular order (the canonical JSON sorts keys).
HASHED_COLUMNS = (
    "saga_id",
    "event_type",
    "step_name",
    "step_index",
    "event_data",
    "context_snapshot",
    "error_message",
    "error_stack_trace",
    "timestamp",
    "duration_ms",
    "user_id",
    "ip_address",
    "saga_state_before",
    "saga_state_after",
    "retry_count",
    "prev_hash",
)

_CARD_RE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


class Redactor:
    """Masks values under sensitive keys and card numbers anywhere in text."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(k.lower() for k in keys if k)
        alternatives = "|".join(re.escape(k) for k in self.keys) or r"(?!)"
        # key=value, key: value, "key": "value" inside free text such as error messages.
        self._inline = re.compile(
            rf"""(?ix)
            (["']?[\w-]*(?:{alternatives})[\w-]*["']?\s*[:=]\s*)
            ("[^"]*"|'[^']*'|(?:(?:bearer|basic|token|digest)\s+)?[^\s,;}}&]+)
            """
        )

    def is_sensitive(self, key: str) -> bool:
        lowered = key.lower()
        return any(k in lowered for k in self.keys)

    def value(self, value: Any) -> Any:
        """A redacted deep copy of a JSON value."""
        if isinstance(value, Mapping):
            return {
                k: (REDACTED if self.is_sensitive(str(k)) else self.value(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 13 <= len(str(abs(value))) <= 19
        ):
            return self.text(str(value)) if _luhn_ok(str(abs(value))) else value
        return value

    def text(self, text: str | None) -> str | None:
        """Free text with inline secrets and card numbers masked."""
        if not text:
            return text
        text = self._inline.sub(lambda m: m.group(1) + REDACTED, text)
        return _CARD_RE.sub(_mask_card, text)


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    if not _luhn_ok(digits):
        return match.group(0)
    return "*" * (len(digits) - 4) + digits[-4:]


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def canonical_json(value: Any) -> str:
    """Keys sorted, no whitespace, non-ASCII kept: the encoding the hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_utc(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a +00:00 offset."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 hex of a row's hashed columns (`AUDIT_HASH_SPEC`); anyone can recompute it."""
    payload = {}
    for column in HASHED_COLUMNS:
        value = row.get(column)
        if isinstance(value, datetime):
            value = iso_utc(value)
        payload[column] = value
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def build_rows(
    saga_id: str,
    context: Mapping[str, Any],
    events: Iterable[AuditEvent],
    now: datetime,
    prev_hash: str,
    redactor: Redactor,
) -> list[dict[str, Any]]:
    """Audit rows of one transition, chained from `prev_hash`; the last one is the new head.

    `context` is the saga's context after the transition (the snapshot, redacted here).
    """
    snapshot = redactor.value(dict(context))
    rows: list[dict[str, Any]] = []
    for event in events:
        row: dict[str, Any] = {
            "saga_id": saga_id,
            "event_type": event.event_type,
            "step_name": event.step_name,
            "step_index": event.step_index,
            "event_data": redactor.value(dict(event.event_data)),
            "context_snapshot": snapshot,
            "error_message": redactor.text(event.error_message),
            "error_stack_trace": redactor.text(event.error_stack_trace),
            "timestamp": now,
            # float() so an int from a remote worker hashes as the Float column reads back.
            "duration_ms": (
                None if event.duration_ms is None else float(round(event.duration_ms, 3))
            ),
            "user_id": event.user_id,
            "ip_address": event.ip_address,
            "saga_state_before": event.state_before.value if event.state_before else None,
            "saga_state_after": event.state_after.value,
            "retry_count": event.retry_count,
            "prev_hash": prev_hash,
        }
        row["hash"] = row_hash(row)
        prev_hash = row["hash"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ verification ---

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
        if row_hash(row) != row.get("hash"):
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


# ---------------------------------------------------------------------- export ---

#: Columns of an export file, in order: the row id, every hashed column, the hash.
EXPORT_COLUMNS = (
    "id",
    "timestamp",
    "saga_id",
    "event_type",
    "step_name",
    "step_index",
    "saga_state_before",
    "saga_state_after",
    "retry_count",
    "duration_ms",
    "user_id",
    "ip_address",
    "error_message",
    "error_stack_trace",
    "event_data",
    "context_snapshot",
    "prev_hash",
    "hash",
)
EXPORT_FORMATS = ("jsonl", "csv")
_JSON_COLUMNS = frozenset({"event_data", "context_snapshot"})
_INT_COLUMNS = frozenset({"id", "step_index", "retry_count"})
_FLOAT_COLUMNS = frozenset({"duration_ms"})
_NULLABLE_TEXT = frozenset(
    {
        "step_name",
        "error_message",
        "error_stack_trace",
        "user_id",
        "ip_address",
        "saga_state_before",
        "saga_state_after",
    }
)


def export_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as written to an export: every column, the timestamp as the hash sees it."""
    record = {column: row.get(column) for column in EXPORT_COLUMNS}
    ts = record["timestamp"]
    if isinstance(ts, datetime):
        record["timestamp"] = iso_utc(ts)
    return record


class ExportWriter:
    """Writes audit rows as JSON Lines or CSV to a binary stream, hashing the bytes written.

    Holds one row at a time. JSONL is lossless; in CSV an empty cell is NULL and JSON
    columns hold canonical JSON text.
    """

    def __init__(self, stream: Any, fmt: str) -> None:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")
        self.stream = stream
        self.fmt = fmt
        self.rows = 0
        self._sha = hashlib.sha256()
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\n")
        if fmt == "csv":
            self._csv.writerow(EXPORT_COLUMNS)
            self._flush()

    def write(self, row: Mapping[str, Any]) -> None:
        record = export_record(row)
        if self.fmt == "jsonl":
            self._buffer.write(
                json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            )
            self._buffer.write("\n")
        else:
            self._csv.writerow([_csv_cell(column, record[column]) for column in EXPORT_COLUMNS])
        self._flush()
        self.rows += 1

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _flush(self) -> None:
        data = self._buffer.getvalue().encode("utf-8")
        self._buffer.seek(0)
        self._buffer.truncate()
        self._sha.update(data)
        self.stream.write(data)


def _csv_cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in _JSON_COLUMNS:
        return canonical_json(value)
    if column in _FLOAT_COLUMNS:
        return repr(float(value))
    return str(value)


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """Where the manifest of an export file lives: beside it, `<file>.manifest.json`."""
    return Path(f"{os.fspath(path)}.manifest.json")


class _HashingReader(io.RawIOBase):
    """A read-only binary stream that hashes every byte read through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n


@dataclass
class ExportFile:
    """An open export: its rows (an iterator) and, once read to the end, its SHA-256."""

    fmt: str
    rows: Iterator[dict[str, Any]]
    reader: _HashingReader

    @property
    def sha256(self) -> str:
        return self.reader.sha.hexdigest()


def open_export(path: str | os.PathLike[str], on_malformed: Any) -> ExportFile:
    """Read an export file lazily; `on_malformed(line_no, message)` hears of unreadable lines."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the row generator
    head = raw.read(1)
    raw.seek(0)
    fmt = "jsonl" if head in (b"{", b"") else "csv"
    reader = _HashingReader(raw)
    text = io.TextIOWrapper(io.BufferedReader(reader), encoding="utf-8", newline="")
    rows = _jsonl_rows(text, on_malformed) if fmt == "jsonl" else _csv_rows(text, on_malformed)
    return ExportFile(fmt, _closing(rows, text), reader)


def _closing(rows: Iterator[dict[str, Any]], text: io.TextIOWrapper) -> Iterator[dict[str, Any]]:
    try:
        yield from rows
        text.read()  # hash any trailing bytes too
    finally:
        text.close()


def _jsonl_rows(text: io.TextIOWrapper, on_malformed: Any) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            on_malformed(number, f"line {number} is not JSON: {exc}")
            continue
        if not isinstance(record, dict):
            on_malformed(number, f"line {number} is not a JSON object")
            continue
        yield record


def _csv_rows(text: io.TextIOWrapper, on_malformed: Any) -> Iterator[dict[str, Any]]:
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        on_malformed(1, f"CSV header unreadable: {exc}")
        return
    if tuple(header) != EXPORT_COLUMNS:
        on_malformed(1, f"CSV header is not the export's columns: {header[:4]}...")
        return
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            on_malformed(reader.line_num, f"line {reader.line_num}: unreadable CSV ({exc})")
            return
        if len(cells) != len(EXPORT_COLUMNS):
            on_malformed(
                reader.line_num,
                f"line {reader.line_num}: {len(cells)} cells, expected {len(EXPORT_COLUMNS)}",
            )
            continue
        try:
            yield _csv_record(cells)
        except ValueError as exc:
            on_malformed(reader.line_num, f"line {reader.line_num}: {exc}")


def _csv_record(cells: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    empty_text: list[str] = []
    for column, cell in zip(EXPORT_COLUMNS, cells, strict=True):
        if cell == "":
            record[column] = None
            if column in _NULLABLE_TEXT:
                empty_text.append(column)
        elif column in _JSON_COLUMNS:
            record[column] = json.loads(cell)
        elif column in _INT_COLUMNS:
            record[column] = int(cell)
        elif column in _FLOAT_COLUMNS:
            record[column] = float(cell)
        else:
            record[column] = cell
    if empty_text and row_hash(record) != record["hash"]:
        # CSV cannot tell NULL from an empty string; the hash says which one was written.
        for size in range(1, len(empty_text) + 1):
            for columns in itertools.combinations(empty_text, size):
                candidate = {**record, **dict.fromkeys(columns, "")}
                if row_hash(candidate) == record["hash"]:
                    return candidate
    return record


# ------------------------------------------------------------------- logging ---


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record's message before it is emitted.

    Install it on the handlers of a process (`install_log_redaction`) so that an error
    message carrying ``password=...`` or a card number is masked in logs as in the audit.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        masked = self.redactor.text(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks quote exception messages (and SQL parameters): mask them as text.
            formatted = logging.Formatter().formatException(record.exc_info)
            masked = f"{masked}\n{self.redactor.text(formatted)}"
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = masked, ()
        return True


def install_log_redaction(redactor: Redactor, logger: logging.Logger | None = None) -> None:
    """Add a `RedactingFilter` to every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(redactor))
