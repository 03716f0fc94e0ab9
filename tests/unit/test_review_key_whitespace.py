"""Review of issue 14: one secret must give one signing key, however it is passed.

SAGA_SIGNING_KEY_FILE's contents are stripped; SAGA_SIGNING_KEY is taken verbatim. A secret
that ends in a newline (`kubectl create secret --from-file`, an env file written with
`echo`), passed as a file to one process and as the variable to another, gives two keys: the
second process refuses to start against the first one's fingerprint (exit 6), though the
operator configured the same secret. The 32-byte minimum also counts the whitespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saga_worker.config import Settings
from saga_worker.errors import ConfigurationError
from saga_worker.keys import fingerprint

SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("padding", ["\n", " ", "\r\n", "\t"])
def test_the_same_secret_as_variable_or_file_gives_the_same_key(
    padding: str, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text(SECRET + padding, encoding="utf-8")
    from_file = Settings.from_env({"SAGA_SIGNING_KEY_FILE": str(tmp_path / "key")}).signing_key
    from_variable = Settings.from_env({"SAGA_SIGNING_KEY": SECRET + padding}).signing_key
    assert from_file is not None and from_variable is not None
    assert fingerprint(from_variable) == fingerprint(from_file)


def test_whitespace_does_not_count_towards_the_minimum_length() -> None:
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        Settings.from_env({"SAGA_SIGNING_KEY": "short-key" + " " * 30})
