"""Per-purpose keys (issue 14 item 10): HKDF-SHA256 against RFC 5869's test vectors, and
tokens and carried checkpoints each signed with their own derived key."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from saga_worker.config import Settings
from saga_worker.errors import ConfigurationError
from saga_worker.keys import (
    PURPOSE_ATTEMPT_TOKEN,
    PURPOSE_STEP_CHECKPOINT,
    fingerprint,
    hkdf_sha256,
    subkey,
)
from saga_worker.tokens import attempt_token, token_valid

# RFC 5869 Appendix A, test cases 1-3 (SHA-256): IKM, salt, info, L, OKM.
RFC_5869 = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes(range(0x00, 0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC_5869)
def test_hkdf_sha256_matches_rfc_5869(
    ikm: str, salt: str, info: str, length: int, okm: str
) -> None:
    derived = hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length)
    assert derived.hex() == okm


def test_hkdf_refuses_impossible_lengths() -> None:
    for length in (0, 255 * 32 + 1):
        with pytest.raises(ValueError):
            hkdf_sha256(b"k", b"s", b"i", length)


KEY = "k" * 40


def test_each_purpose_has_its_own_key_and_none_is_the_key_itself() -> None:
    keys = {subkey(KEY, p) for p in (PURPOSE_ATTEMPT_TOKEN, PURPOSE_STEP_CHECKPOINT)}
    assert len(keys) == 2 and KEY.encode() not in keys
    assert subkey(KEY, PURPOSE_ATTEMPT_TOKEN) != subkey("j" * 40, PURPOSE_ATTEMPT_TOKEN)
    assert KEY not in fingerprint(KEY) and KEY.encode().hex() not in fingerprint(KEY)
    assert fingerprint(KEY) != fingerprint("j" * 40) and len(fingerprint(KEY)) == 64


def test_attempt_tokens_are_signed_with_the_token_subkey_not_the_raw_key() -> None:
    token = attempt_token(KEY, "s-1", 0, "forward", 1)
    raw = hmac.new(KEY.encode(), b"s-1\x1f0\x1fforward\x1f1", hashlib.sha256).hexdigest()
    assert token != raw
    derived = hmac.new(
        subkey(KEY, PURPOSE_ATTEMPT_TOKEN), b"s-1\x1f0\x1fforward\x1f1", hashlib.sha256
    ).hexdigest()
    assert token == derived
    assert token_valid(KEY, token, "s-1", 0, "forward", 1)
    assert not token_valid(KEY, raw, "s-1", 0, "forward", 1)


@pytest.mark.parametrize("variable", ["SAGA_SIGNING_KEY", "SAGA_SIGNING_KEY_FILE"])
def test_a_signing_key_shorter_than_32_bytes_is_refused(variable: str, tmp_path: Path) -> None:
    short = "s" * 31
    env = {variable: short}
    if variable.endswith("_FILE"):
        (tmp_path / "key").write_text(short + "\n", encoding="utf-8")
        env = {variable: str(tmp_path / "key")}
    with pytest.raises(ConfigurationError, match="at least 32 bytes") as raised:
        Settings.from_env(env)
    assert short not in str(raised.value)  # the message never repeats the key
    assert Settings.from_env({"SAGA_SIGNING_KEY": "é" * 16}).signing_key == "é" * 16  # bytes
