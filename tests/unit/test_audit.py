"""Audit rows: the SHA-256 hash chain of docs/audit.md, its verification, and redaction."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import logging
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import rfc8785

from saga_worker.audit.chain import GENESIS_HASH, build_rows, row_hash
from saga_worker.audit.export import EXPORT_COLUMNS, ExportWriter, export_record, open_export
from saga_worker.audit.redaction import REDACTED, Redactor, install_log_redaction
from saga_worker.audit.verify import (
    BROKEN_LINK,
    MISSING_ROWS,
    MISSING_TAIL,
    MODIFIED,
    ORPHAN,
    OUT_OF_ORDER,
    ChainVerifier,
    describe_tail,
    verify_chain,
)
from saga_worker.config import DEFAULT_REDACT_KEYS
from saga_worker.core.decision import AuditEvent
from saga_worker.core.model import Saga, SagaState

TS = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)
REDACTOR = Redactor(DEFAULT_REDACT_KEYS)

ALL_COLUMNS = (
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


def sample_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 17,
        "saga_id": "bt-2026-0001",
        "event_type": "step_retry",
        "step_name": "run_strategy",
        "step_index": 1,
        "event_data": {"attempt": 1, "delay_seconds": 2.5, "nested": {"b": [1, None, True]}},
        "context_snapshot": {"strategy_id": 42, "note": "Zürich → 東京", "z": 1, "a": 2},
        "error_message": "boom",
        "error_stack_trace": None,
        "timestamp": TS,
        "duration_ms": 12.5,
        "user_id": "user_123",
        "ip_address": "192.168.1.1",
        "saga_state_before": "RUNNING",
        "saga_state_after": "RUNNING",
        "retry_count": 1,
        "prev_hash": GENESIS_HASH,
    }
    row.update(changes)
    return row


def independent_hash(row: dict[str, Any], timestamp_text: str) -> str:
    """The hash recomputed from docs/audit.md (Hash definition) alone, without saga_worker:
    an independent RFC 8785 library."""
    payload = {k: row[k] for k in row if k not in ("id", "hash")}
    payload["timestamp"] = timestamp_text
    return hashlib.sha256(rfc8785.dumps(payload)).hexdigest()


# --------------------------------------------------------------- row_hash ---


def test_row_hash_is_sha256_of_canonical_json_as_designed() -> None:
    row = sample_row()
    expected = independent_hash(row, "2026-03-04T05:06:07.000089+00:00")
    assert row_hash(row) == expected
    assert len(expected) == 64 and expected == expected.lower()


def test_row_hash_canonical_text_by_hand() -> None:
    """Spell the canonical bytes out literally: sorted keys, no spaces, UTF-8 kept."""
    row: dict[str, Any] = dict.fromkeys(ALL_COLUMNS)
    row.update(
        saga_id="s",
        event_type="saga_start",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        context_snapshot={"b": "é", "a": [1, 2]},
        saga_state_after="RUNNING",
        prev_hash=GENESIS_HASH,
    )
    canonical = (
        '{"context_snapshot":{"a":[1,2],"b":"é"},"duration_ms":null,"error_message":null,'
        '"error_stack_trace":null,"event_data":null,"event_type":"saga_start",'
        '"ip_address":null,"prev_hash":"' + GENESIS_HASH + '","retry_count":null,'
        '"saga_id":"s","saga_state_after":"RUNNING","saga_state_before":null,'
        '"step_index":null,"step_name":null,"timestamp":"2026-01-01T00:00:00.000000+00:00",'
        '"user_id":null}'
    )
    assert row_hash(row) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    # Non-ASCII is kept as is, not \u-escaped: the escaped form hashes differently.
    escaped = canonical.replace("é", "\\u00e9")
    assert row_hash(row) != hashlib.sha256(escaped.encode("utf-8")).hexdigest()


def test_row_hash_normalises_timestamps_to_utc_with_microseconds() -> None:
    same_instant = TS.astimezone(timezone(timedelta(hours=2)))
    assert row_hash(sample_row(timestamp=same_instant)) == row_hash(sample_row())
    # A naive timestamp (as SQLite returns it) is read as UTC.
    assert row_hash(sample_row(timestamp=TS.replace(tzinfo=None))) == row_hash(sample_row())
    whole_second = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert row_hash(sample_row(timestamp=whole_second)) == independent_hash(
        sample_row(), "2026-03-04T05:06:07.000000+00:00"
    )


def test_row_hash_ignores_id_and_hash_but_covers_every_other_column() -> None:
    row = sample_row()
    base = row_hash(row)
    assert row_hash({**row, "id": 999, "hash": "x" * 64}) == base
    for column in ALL_COLUMNS:
        changed = dict(row)
        changed[column] = "tampered" if row[column] is not None else "set"
        assert row_hash(changed) != base, column
    # A missing column counts as NULL.
    assert row_hash({**row, "error_stack_trace": None}) == row_hash(
        {k: v for k, v in row.items() if k != "error_stack_trace"}
    )


# ------------------------------------------------------------- build_rows ---


def _saga(context: dict[str, Any]) -> Saga:
    return Saga(
        saga_id="bt-1",
        saga_type="backtest_workflow",
        state=SagaState.RUNNING,
        context=context,
        current_step_index=0,
        total_steps=3,
        started_at=TS,
        updated_at=TS,
        attempts=(),
        user_id="user_123",
        ip_address="10.0.0.1",
    )


def _events() -> list[AuditEvent]:
    return [
        AuditEvent(
            "saga_start",
            None,
            SagaState.RUNNING,
            event_data={"saga_type": "backtest_workflow"},
            user_id="user_123",
        ),
        AuditEvent(
            "step_start",
            SagaState.RUNNING,
            SagaState.RUNNING,
            "create_backtest",
            0,
            event_data={"attempt": 1},
            user_id="user_123",
        ),
        AuditEvent(
            "step_retry",
            SagaState.RUNNING,
            SagaState.RUNNING,
            "create_backtest",
            0,
            event_data={"attempt": 1, "api_key": "k-1"},
            error_message="connect failed password=hunter2",
            duration_ms=1.23456,
            retry_count=1,
        ),
    ]


def test_build_rows_chains_from_genesis() -> None:
    rows = build_rows(
        "bt-1", {"strategy_id": 42, "password": "pw"}, _events(), TS, GENESIS_HASH, REDACTOR
    )
    assert [r["event_type"] for r in rows] == ["saga_start", "step_start", "step_retry"]
    assert rows[0]["prev_hash"] == "0" * 64
    for previous, row in itertools.pairwise(rows):
        assert row["prev_hash"] == previous["hash"]
    for row in rows:
        assert row["hash"] == independent_hash(row, "2026-03-04T05:06:07.000089+00:00")
        # Only the start's row carries the context; a step_start or step_retry changes none.
        expected = {"strategy_id": 42, "password": REDACTED}
        assert row["context_snapshot"] == (expected if row["event_type"] == "saga_start" else None)
        assert row["timestamp"] == TS
        assert row["saga_id"] == "bt-1"
    assert rows[0]["saga_state_before"] is None
    assert rows[0]["saga_state_after"] == "RUNNING"
    assert (rows[1]["step_name"], rows[1]["step_index"]) == ("create_backtest", 0)
    retry = rows[2]
    assert retry["retry_count"] == 1
    assert retry["duration_ms"] == 1.235
    assert retry["event_data"] == {"attempt": 1, "api_key": REDACTED}
    assert retry["error_message"] == f"connect failed password={REDACTED}"
    assert verify_chain(rows) == []


def test_build_rows_continues_an_existing_chain() -> None:
    first = build_rows("bt-1", {}, _events()[:1], TS, GENESIS_HASH, REDACTOR)
    more = build_rows("bt-1", {}, _events()[1:], TS, first[-1]["hash"], REDACTOR)
    assert more[0]["prev_hash"] == first[0]["hash"]
    assert verify_chain([*first, *more]) == []
    assert build_rows("bt-1", {}, [], TS, GENESIS_HASH, REDACTOR) == []


# ----------------------------------------------------------- verify_chain ---


def _chain(n: int = 4, saga_id: str = "bt-1") -> list[dict[str, Any]]:
    rows = []
    prev = GENESIS_HASH
    for i in range(n):
        row = sample_row(
            id=i + 1,
            saga_id=saga_id,
            step_index=i,
            prev_hash=prev,
            timestamp=TS + timedelta(seconds=i),
        )
        row["hash"] = row_hash(row)
        prev = row["hash"]
        rows.append(row)
    return rows


def test_verify_chain_accepts_an_intact_chain_and_interleaved_sagas() -> None:
    a, b = _chain(3, "a"), _chain(3, "b")
    assert verify_chain(a) == []
    assert verify_chain([a[0], b[0], a[1], b[1], b[2], a[2]]) == []


def test_verify_chain_detects_a_modified_field() -> None:
    rows = _chain()
    rows[2] = {**rows[2], "error_message": "nothing happened"}
    problems = verify_chain(rows)
    assert [(p.saga_id, p.row_id) for p in problems] == [("bt-1", 3)]
    assert "hash does not match" in problems[0].problem


def test_verify_chain_detects_a_modified_json_value_deep_inside() -> None:
    rows = copy.deepcopy(_chain())
    rows[1]["event_data"]["nested"]["b"][0] = 2
    assert [p.row_id for p in verify_chain(rows)] == [2]


def test_verify_chain_detects_a_deleted_row() -> None:
    rows = _chain()
    del rows[1]
    problems = verify_chain(rows)
    assert [p.row_id for p in problems] == [3]
    assert "prev_hash" in problems[0].problem


def test_verify_chain_detects_a_deleted_first_row() -> None:
    rows = _chain()[1:]
    assert [p.row_id for p in verify_chain(rows)] == [2]


def test_verify_chain_detects_an_inserted_forged_row() -> None:
    rows = _chain()
    # A forger who knows the hash recipe links the row to its predecessor correctly...
    forged = sample_row(
        id=99, saga_id="bt-1", event_type="step_complete", prev_hash=rows[1]["hash"]
    )
    forged["hash"] = row_hash(forged)
    tampered = [*rows[:2], forged, *rows[2:]]
    problems = verify_chain(tampered)
    # ...but the next genuine row still points at the row before it.
    assert [p.row_id for p in problems] == [3]


def test_verify_chain_detects_two_swapped_rows() -> None:
    rows = _chain()
    rows[1], rows[2] = rows[2], rows[1]
    problems = verify_chain(rows)
    # Order is now 1, 3, 2, 4: each of the last three follows the wrong row.
    assert [p.row_id for p in problems] == [3, 2, 4]
    assert all("prev_hash" in p.problem for p in problems)


# ---------------------------------------------------------------- redaction ---


def test_redactor_masks_nested_keys_case_insensitively() -> None:
    value: dict[str, Any] = {
        "user": {
            "Password": "hunter2",
            "profile": {"API_KEY": "k", "name": "Ann"},
            "items": [{"Authorization": {"scheme": "Bearer", "value": "abc"}}, {"ok": 1}],
        },
        "x-Api_Key-header": "k2",
        "strategy_id": 42,
        "tags": ["a", ["b", {"client_SECRET": "s"}]],
    }
    assert REDACTOR.value(value) == {
        "user": {
            "Password": REDACTED,
            "profile": {"API_KEY": REDACTED, "name": "Ann"},
            "items": [{"Authorization": REDACTED}, {"ok": 1}],
        },
        "x-Api_Key-header": REDACTED,
        "strategy_id": 42,
        "tags": ["a", ["b", {"client_SECRET": REDACTED}]],
    }
    assert value["user"]["Password"] == "hunter2"  # a copy, the input is untouched


def test_redactor_extra_keys_and_no_keys() -> None:
    r = Redactor(("SessionID", ""))
    assert r.value({"my_sessionid": "x", "password": "p"}) == {
        "my_sessionid": REDACTED,
        "password": "p",
    }
    assert Redactor(()).text("password=hunter2") == "password=hunter2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login failed: password=hunter2", f"login failed: password={REDACTED}"),
        ('response {"token": "abc", "n": 1}', f'response {{"token": {REDACTED}, "n": 1}}'),
        ("PASSWORD = 'two words'", f"PASSWORD = {REDACTED}"),
        ("GET /x?api_key=abc&page=2", f"GET /x?api_key={REDACTED}&page=2"),
        ("db_password: s3cr3t; retrying", f"db_password: {REDACTED}; retrying"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redactor_masks_inline_secrets_in_text(text: str, expected: str) -> None:
    assert REDACTOR.text(text) == expected
    assert "hunter2" not in REDACTOR.value({"error": text})["error"]


def test_redactor_masks_bearer_token_in_authorization_header_text() -> None:
    redacted = REDACTOR.text("401 with header Authorization: Bearer eyJhbGciOi.x.y")
    assert redacted is not None
    assert "eyJhbGciOi" not in redacted


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5500005555555559",
        "378282246310005",
    ],
)
def test_redactor_masks_luhn_valid_card_numbers(card: str) -> None:
    out = REDACTOR.text(f"charge failed for {card} today")
    assert out is not None
    digits = "".join(ch for ch in card if ch.isdigit())
    assert digits not in out.replace(" ", "").replace("-", "")
    assert out.startswith("charge failed for ") and out.endswith(" today")
    assert out == f"charge failed for {'*' * (len(digits) - 4)}{digits[-4:]} today"
    assert REDACTOR.value({"note": card}) == {"note": "*" * (len(digits) - 4) + digits[-4:]}


@pytest.mark.parametrize(
    "digits",
    ["4111111111111112", "1234567890123456", "12345678901", "41111111111111111111111"],
)
def test_redactor_leaves_non_luhn_and_odd_length_digit_runs(digits: str) -> None:
    text = f"order {digits} placed"
    assert REDACTOR.text(text) == text


def test_redactor_text_passes_none_and_empty_through() -> None:
    assert REDACTOR.text(None) is None
    assert REDACTOR.text("") == ""


# ------------------------------------------------------ heads and orphans ---


def test_check_head_catches_a_deleted_last_row_and_appended_rows() -> None:
    rows = _chain(4)
    verifier = ChainVerifier()
    for row in rows[:-1]:  # the last row was deleted: no link breaks
        verifier.add(row)
    assert verifier.ok
    assert verifier.check_head("bt-1", rows[-1]["hash"]) is False
    assert [(p.kind, p.row_id) for p in verifier.problems] == [(MISSING_TAIL, 3)]
    assert "last row" in describe_tail(rows[:-1], rows[-1]["hash"])
    # a forged row appended after the real head
    assert "inserted" in describe_tail(rows, rows[2]["hash"])


def test_check_head_catches_a_saga_whose_rows_all_vanished_and_orphans() -> None:
    verifier = ChainVerifier()
    for row in _chain(2, "orphan"):
        verifier.add(row)
    rejected = sample_row(id=50, saga_id="rej", event_type="saga_rejected", prev_hash=GENESIS_HASH)
    rejected["hash"] = row_hash(rejected)
    verifier.add(rejected)
    assert verifier.check_head("gone", "f" * 64) is False
    verifier.check_orphans()
    kinds = sorted((p.saga_id, p.kind) for p in verifier.problems)
    # a rejection has no checkpoint by design: not an orphan
    assert kinds == [("gone", MISSING_ROWS), ("orphan", ORPHAN)]


def test_partial_chains_accept_a_mid_chain_start_but_check_later_links() -> None:
    rows = _chain(4)[2:]
    assert verify_chain(rows) != []
    verifier = ChainVerifier(partial_chains=True)
    for row in rows:
        verifier.add(row)
    assert verifier.ok


def test_integer_duration_hashes_like_the_float_column_reads_back() -> None:
    event = AuditEvent("step_complete", SagaState.RUNNING, SagaState.RUNNING, duration_ms=5)
    (row,) = build_rows("bt-1", {}, [event], TS, GENESIS_HASH, REDACTOR)
    assert isinstance(row["duration_ms"], float)
    assert row_hash({**row, "duration_ms": 5.0}) == row["hash"]


# ----------------------------------------------------------------- export ---


def _export_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    heads = {"s-a": GENESIS_HASH, "s-b": GENESIS_HASH}
    for i in range(6):
        saga = "s-a" if i % 2 == 0 else "s-b"
        row = sample_row(
            id=i + 1,
            saga_id=saga,
            prev_hash=heads[saga],
            timestamp=TS + timedelta(milliseconds=i),
            error_stack_trace='Traceback:\n  File "x", line 1\nValueError: "quoted", comma',
            error_message="" if i == 3 else "boom, with comma",
            step_name=None if i == 0 else "run_strategy",
            duration_ms=None if i == 1 else 3.0,
        )
        row["hash"] = row_hash(row)
        heads[saga] = row["hash"]
        rows.append(row)
    return rows


def _write(tmp_path: Path, fmt: str, rows: list[dict[str, Any]]) -> tuple[Path, str]:
    path = tmp_path / f"audit.{fmt}"
    with path.open("wb") as stream:
        writer = ExportWriter(stream, fmt)
        for row in rows:
            writer.write(row)
    return path, writer.sha256


def _read(path: Path) -> tuple[list[dict[str, Any]], list[str], str]:
    malformed: list[str] = []
    export = open_export(path, lambda line, message: malformed.append(message))
    rows = list(export.rows)
    return rows, malformed, export.sha256


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_round_trips_every_column_and_verifies(tmp_path: Path, fmt: str) -> None:
    rows = _export_rows()
    path, digest = _write(tmp_path, fmt, rows)
    back, malformed, read_digest = _read(path)
    assert malformed == [] and read_digest == digest
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert [tuple(r) for r in back] == [EXPORT_COLUMNS] * len(rows)
    for original, copy_ in zip(rows, back, strict=True):
        assert copy_ == export_record(original)
    assert back[3]["error_message"] == ""  # CSV: the hash tells "" from NULL
    assert back[0]["step_name"] is None
    assert verify_chain(back) == []


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_tampered_export_file_is_detected(tmp_path: Path, fmt: str) -> None:
    rows = _export_rows()
    path, _ = _write(tmp_path, fmt, rows)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[:1] if fmt == "csv" else []
    body = lines[len(header) :]
    # Records span lines in CSV (stack traces hold newlines): regroup by record.
    records = _records(body, fmt)

    def check(new_records: list[str]) -> list[Any]:
        path.write_text("".join(header + new_records), encoding="utf-8")
        back, _, _ = _read(path)
        verifier = ChainVerifier(check_order=True)
        for row in back:
            verifier.add(row)
        return verifier.problems

    changed = [*records]
    changed[2] = changed[2].replace("boom", "fine")
    assert [(p.row_id, p.kind) for p in check(changed)] == [(3, MODIFIED)]
    deleted = records[:2] + records[3:]  # row 3 of s-a gone: row 5 of s-a breaks
    assert [(p.row_id, p.kind) for p in check(deleted)] == [(5, BROKEN_LINK)]
    swapped = [records[0], records[1], records[4], records[3], records[2], records[5]]
    problems = check(swapped)
    assert {p.kind for p in problems} == {OUT_OF_ORDER, BROKEN_LINK}
    assert {p.row_id for p in problems if p.kind == BROKEN_LINK} == {5, 3}
    forged_row = sample_row(id=7, saga_id="s-a", prev_hash=rows[2]["hash"], event_type="forged")
    forged_row["hash"] = row_hash(forged_row)
    forged = _records_of(tmp_path, fmt, [forged_row])
    inserted = [*records[:3], *forged, *records[3:]]
    problems = check(inserted)
    assert (5, BROKEN_LINK) in [(p.row_id, p.kind) for p in problems]


def _records(body: list[str], fmt: str) -> list[str]:
    if fmt == "jsonl":
        return body
    records: list[str] = []
    current = ""
    for line in body:
        current += line
        if current.count('"') % 2 == 0:
            records.append(current)
            current = ""
    return records


def _records_of(tmp_path: Path, fmt: str, rows: list[dict[str, Any]]) -> list[str]:
    path, _ = _write_other(tmp_path, fmt, rows)
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return _records(text[1:] if fmt == "csv" else text, fmt)


def _write_other(tmp_path: Path, fmt: str, rows: list[dict[str, Any]]) -> tuple[Path, str]:
    folder = tmp_path / "other"
    folder.mkdir(exist_ok=True)
    return _write(folder, fmt, rows)


def test_malformed_lines_are_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1\n[1, 2]\n', encoding="utf-8")
    rows, malformed, _ = _read(path)
    assert rows == [] and len(malformed) == 2


# ------------------------------------------------------------------ logging ---


def test_redacting_filter_masks_messages_and_tracebacks() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("saga-test-redaction")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    install_log_redaction(REDACTOR, logger)
    try:
        logger.warning("connect failed password=%s for card %s", "hunter2", "4111111111111111")
        try:
            raise RuntimeError("token=abc123 rejected")
        except RuntimeError:
            logger.exception("step failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "hunter2" not in text and "4111111111111111" not in text and "abc123" not in text
    assert "password=***REDACTED***" in text and "1111" in text
    assert "RuntimeError" in text  # the traceback is kept, masked
