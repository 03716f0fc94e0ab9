"""Export files: audit rows written as JSON Lines or CSV, and read back for verification.

The file format only: which columns in which order, how a CSV cell encodes NULL, JSON and
floats so that every row hashes again as it did in the database, the digest of the bytes
written or read, and where a file's manifest lives. What goes into a manifest, and checking
it, is audit/archive.py's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .chain import hash_scheme, iso_utc, legacy_canonical_json

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
        return legacy_canonical_json(value)  # exact: JCS would round integers past 2**53
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
    if empty_text and hash_scheme(record) is None:
        # CSV cannot tell NULL from an empty string; the hash says which one was written.
        for size in range(1, len(empty_text) + 1):
            for columns in itertools.combinations(empty_text, size):
                candidate = {**record, **dict.fromkeys(columns, "")}
                if hash_scheme(candidate) is not None:
                    return candidate
    return record
